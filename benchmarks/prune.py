"""Prune benchmark: every prune method against `random` at the same sparsity, on MNIST-5k.

For the small CNN and the tiny ViT, per seed: train a dense base (AdamW, ``--epochs``), then
for each method and sparsity prune it through the stage's own registry and recovery, and
record test accuracy, bytes on disk (the artifact as the stage writes it: sparse-stored when
masked, smaller when structured, factors when low-rank), CPU latency at batch 1 and 256
(median of repeats; masked weights run dense, so sparsity alone buys no speed here), and the
ranks of the low-rank methods. ``nm`` is 50% by construction; ``channel`` (CNN) and ``heads``
(ViT) run at keep fractions 1 - s for s in {0.5, 0.7}; ``svd`` at rank ratios 1 - s;
``welore`` at parameter compression s; ``trp`` at the energies in TRP_ENERGY, each paired
with ``svd@trp`` (SVD at TRP's ranks plus fine-tuning). Rows go to
benchmarks/results/prune.csv as they finish (``--resume`` keeps them); then a table and a
plot (accuracy vs sparsity per method, one panel per model).

    python -m benchmarks.prune [--archs cnn vit] [--seeds 0 1 2] [--sparsities 0.5 0.7 0.8 0.9 0.95]
                               [--methods magnitude random ...] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import torch

from benchmarks.select import load_mnist5k
from slimforge.artifacts import WEIGHTS
from slimforge.checkpoint import load_model, model_spec, save_model
from slimforge.models import CNNConfig, ViTConfig, build_model
from slimforge.training import FitConfig, MaskHold, accuracy, fit
from tasks.evaluate.harness import latency_ms
from tasks.prune import METHODS
from tasks.prune.channel import slim_config
from tasks.prune.common import PruneContext, Pruned, prunable, sparsity_report
from tasks.prune.lowrank import factorize_with_ranks
from tasks.prune.magnitude import apply_masks, magnitude_masks
from tasks.prune.stage import recover, result_spec
from tasks.train.init import initialize

OUT = Path(__file__).parent / "results"
ARCHS = {"cnn": CNNConfig(), "vit": ViTConfig()}
SPARSE = ["magnitude", "random", "imp", "gmp", "granet", "layer_adaptive", "sparse_soup"]
STRUCTURED = {"cnn": "channel", "vit": "heads"}  # the structured method each arch supports
# TRP has no budget knob but its energy e; its rows sit under these nominal budgets and
# report the parameters they reached. Each TRP row is paired with ``svd@trp``: plain SVD of
# the base at TRP's final ranks, then the usual recovery fine-tune (METHODS.md's claim).
TRP_ENERGY = {0.5: 0.98, 0.7: 0.95, 0.8: 0.9}
DASHED = {"channel", "channel_scratch", "heads", "svd", "welore", "trp", "svd@trp", "magnitude_reinit"}
SHAPE, CLASSES = (1, 28, 28), 10


def method_config(method: str, sparsity: float, seed: int, train: dict, recovery: dict | None = None):
    """The method's config at this budget, with training runs as long as the base's."""
    epochs = train["epochs"]
    fields = {"magnitude": {"sparsity": sparsity}, "random": {"sparsity": sparsity},
              "imp": {"sparsity": sparsity, "rate": 0.5, "training": train},
              "gmp": {"final_sparsity": sparsity, "training": train, "end_epoch": max(1, epochs * 3 // 4),
                      "prune_every": 20, "start": "trained"},
              "granet": {"final_sparsity": sparsity, "training": train, "end_epoch": max(1, epochs * 3 // 4),
                         "prune_every": 20, "start": "trained"},
              "layer_adaptive": {"sparsity": sparsity},
              "nm": {}, "channel": {"keep_fraction": 1 - sparsity}, "heads": {"keep_fraction": 1 - sparsity},
              "svd": {"ratio": 1 - sparsity}, "welore": {"compression": sparsity},
              "trp": {"energy": TRP_ENERGY.get(sparsity, 0.98)},  # its own training defaults (SGD, as the paper)
              "sparse_soup": {"sparsity": sparsity, "rounds": 3, "ingredients": 3,
                              "training": {**train, "epochs": max(1, epochs // 4)}}}[method]
    recovery = recovery or {"epochs": 2, "batch_size": 128, "optimizer": "adamw", "lr": 5e-4}
    return METHODS[method].config(method=method, seed=seed, recovery=recovery, **fields)


def budgets(method: str, sparsities: list[float]) -> list[float]:
    if method == "nm":
        return [0.5]
    if method in ("channel", "heads"):
        return [s for s in sparsities if s <= 0.7]
    if method == "trp":
        return [s for s in sparsities if s in TRP_ENERGY]
    return sparsities


def measure(model, spec: dict, masked: bool, test) -> dict:
    """Accuracy, bytes of the stage's artifact, and the evaluate harness's latency at batch 1 and 256."""
    with tempfile.TemporaryDirectory() as d:
        save_model(Path(d), model.state_dict(), spec, root=Path(d), stage="prune", method="bench", config={},
                   seed=0, parents={}, format="sparse" if masked else "dense")
        size = (Path(d) / WEIGHTS).stat().st_size
        loaded = load_model(Path(d))  # what a user gets back
    return {"test_accuracy": accuracy(loaded, *test), "bytes": size,
            **{f"ms_b{b}": latency_ms(loaded, SHAPE, b, repeats=20, warmup=3, generator=torch.Generator().manual_seed(0))
               for b in (1, 256)}}


def rethinking_baselines(arch, base, x, y, seed, train: dict, sparsities, test, spec) -> list[dict]:
    """Liu et al., "Rethinking the Value of Network Pruning" (ICLR 2019): the magnitude mask
    with a fresh random init trained as long as the base (``magnitude_reinit``), and the slim
    channel architecture trained from scratch (``channel_scratch``)."""
    rows = []
    train_cfg = FitConfig(**train)
    for s in sparsities:
        g = torch.Generator().manual_seed(10_000 + seed)
        masks = magnitude_masks(prunable(base), s, "global")
        model = build_model(ARCHS[arch], SHAPE, CLASSES)
        initialize(model, "kaiming", g)
        apply_masks(model, masks)
        fit(model, x, y, train_cfg, g, hold=MaskHold(model, masks), label=f"reinit {s}")
        rows.append({"method": "magnitude_reinit", "sparsity_target": s, "model": model, "masked": True, "spec": spec})
        if arch == "cnn" and s <= 0.7:
            slim_cfg = slim_config(ARCHS[arch], 1 - s)
            model = build_model(slim_cfg, SHAPE, CLASSES)
            initialize(model, "kaiming", g)
            fit(model, x, y, train_cfg, g, label=f"scratch {s}")
            rows.append({"method": "channel_scratch", "sparsity_target": s, "model": model, "masked": False,
                         "spec": model_spec(slim_cfg, SHAPE, CLASSES)})
    return [{"arch": arch, "seed": seed, "method": r["method"], "sparsity_target": r["sparsity_target"],
             **sparsity_report(r["model"], None), **measure(r["model"], r["spec"], r["masked"], test)}
            for r in rows]


def svd_at_ranks(arch, base, ranks, cfg, x, y, g, spec, s, seed, test) -> dict:
    """``svd@trp``: the dense base cut at TRP's ranks by truncated SVD, then fine-tuned as recovery."""
    model = copy.deepcopy(base)
    factorize_with_ranks(model, ranks)
    result = Pruned(model, ranks=ranks)
    recover(result, cfg.model_copy(update={"recovery_params": "all"}), x, y, g)
    return {"arch": arch, "method": "svd@trp", "sparsity_target": s, "seed": seed, "ranks": json.dumps(ranks),
            **sparsity_report(model, None), **measure(model, result_spec(spec, result), False, test)}


def train_base(arch: str, x, y, seed: int, train: dict):
    g = torch.Generator().manual_seed(seed)
    model = build_model(ARCHS[arch], SHAPE, CLASSES)
    initialize(model, "kaiming", g)
    init_state = (copy.deepcopy(model.state_dict()), g.get_state())
    fit(model, x, y, FitConfig(**train), g, label=f"{arch} base")
    return model, init_state


def at_init(arch: str, init_state: tuple[dict, torch.Tensor]):
    """The base at its initialisation, and the generator as the base's training went on with it."""
    weights, rng = init_state
    model = build_model(ARCHS[arch], SHAPE, CLASSES)
    model.load_state_dict(weights)
    g = torch.Generator()
    g.set_state(rng)
    return model, g


def run(args) -> pd.DataFrame:
    x, y, *test = load_mnist5k()
    path = OUT / (args.csv or "prune.csv")
    rows = pd.read_csv(path).to_dict("records") if args.resume and path.exists() else []
    done = {(r["arch"], r["method"], float(r["sparsity_target"]), int(r["seed"])) for r in rows}
    train = {"epochs": args.epochs, "batch_size": 128, "optimizer": "adamw", "lr": args.lr}
    for arch in args.archs:
        spec = model_spec(ARCHS[arch], SHAPE, CLASSES)
        for seed in args.seeds:
            base, init_state = train_base(arch, x, y, seed, train)
            if (arch, "dense", 0.0, seed) not in done:
                rows.append({"arch": arch, "method": "dense", "sparsity_target": 0.0, "seed": seed,
                             **sparsity_report(base, None), **measure(base, spec, False, test)})
            if args.baselines and (arch, "magnitude_reinit", float(args.sparsities[0]), seed) not in done:
                rows += rethinking_baselines(arch, base, x, y, seed, train, args.sparsities, test, spec)
            for method in args.methods:
                if method in STRUCTURED.values() and STRUCTURED[arch] != method:
                    continue  # channel pruning is for the CNN, head pruning for the ViT
                for s in budgets(method, args.sparsities):
                    if (arch, method + args.tag, float(s), seed) in done:
                        continue
                    cfg = method_config(method, s, seed, train,
                                        {"epochs": args.recovery_epochs, "batch_size": 128, "optimizer": "adamw",
                                         "lr": args.recovery_lr})
                    g = torch.Generator().manual_seed(seed)

                    ctx = PruneContext(copy.deepcopy(base), ARCHS[arch], SHAPE, CLASSES, x, y, g,
                                       functools.partial(at_init, arch, init_state))
                    t0 = time.perf_counter()
                    result = METHODS[method].prune(ctx, cfg)
                    recover(result, cfg, x, y, g)
                    seconds = time.perf_counter() - t0
                    row = {"arch": arch, "method": method + args.tag, "sparsity_target": s, "seed": seed, "seconds": seconds,
                           **sparsity_report(result.model, result.masks),
                           **measure(result.model, result_spec(spec, result), bool(result.masks), test)}
                    if result.ranks:
                        row["ranks"] = json.dumps(result.ranks)
                    rows.append(row)
                    if method == "trp":
                        rows.append(svd_at_ranks(arch, base, result.ranks, cfg, x, y, g, spec, s, seed, test))
                    print({k: row[k] for k in ("arch", "method", "sparsity_target", "seed", "test_accuracy",
                                               "sparsity", "bytes")}, flush=True)
                    pd.DataFrame(rows).to_csv(path, index=False)
    pd.DataFrame(rows).to_csv(path, index=False)
    return pd.DataFrame(rows)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    g = df.groupby(["arch", "method", "sparsity_target"])
    out = g.agg(acc=("test_accuracy", "mean"), std=("test_accuracy", "std"), n=("seed", "count"),
                sparsity=("sparsity", "mean"), params=("parameters", "mean"), bytes=("bytes", "mean"),
                ms_b1=("ms_b1", "median"), ms_b256=("ms_b256", "median")).reset_index()
    out[["acc", "std"]] *= 100
    rand = out[out.method == "random"].set_index(["arch", "sparsity_target"])["acc"]
    out["vs_random"] = [a - rand.get((r, s), float("nan")) for a, r, s in zip(out.acc, out.arch, out.sparsity_target)]
    return out.round(3)


def plot(table: pd.DataFrame, path: Path) -> None:
    archs = sorted(table.arch.unique())
    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4.5), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        part = table[table.arch == arch]
        for i, (method, m) in enumerate(part.groupby("method")):
            style = "--" if method in DASHED else "-"
            ax.errorbar(m["sparsity_target"], m["acc"], yerr=m["std"].fillna(0), marker="os^D"[i % 4], ls=style,
                        capsize=3, color=plt.cm.tab20(i % 20), label=method)
        ax.set_title(arch)
        ax.set_xlabel("target sparsity (channel: 1 − keep fraction; svd: 1 − rank ratio)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95])
    ap.add_argument("--methods", nargs="+", default=[*SPARSE, "nm", "channel", "heads", "svd", "welore", "trp"],
                    choices=list(METHODS))
    ap.add_argument("--epochs", type=int, default=8, help="epochs of the dense base (and of imp/gmp/granet runs)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the base (and imp/gmp/granet/soup runs)")
    ap.add_argument("--recovery-epochs", type=int, default=2, help="AdamW epochs of recovery after pruning")
    ap.add_argument("--recovery-lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-baselines", dest="baselines", action="store_false",
                    help="skip the Rethinking baselines (random re-init with the mask, slim net from scratch)")
    ap.add_argument("--csv", help="results file under benchmarks/results (default prune.csv); parallel runs write "
                                  "separate files, the table reads all prune*.csv")
    ap.add_argument("--tag", default="", help="suffix of the method names in the rows, e.g. ' (6 ep)' for a "
                                                "run with other recovery settings")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--quick", action="store_true", help="one seed, CNN, two sparsities, 1 epoch: a smoke run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.archs, args.seeds, args.sparsities, args.epochs = ["cnn"], [0], [0.5, 0.9], 1
    OUT.mkdir(parents=True, exist_ok=True)
    run(args)
    df = pd.concat([pd.read_csv(f) for f in sorted(OUT.glob("prune*.csv"))], ignore_index=True)
    table = summarize(df.drop_duplicates(["arch", "method", "sparsity_target", "seed"], keep="last"))
    plot(table, OUT / "prune.png")
    pd.set_option("display.width", 200)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
