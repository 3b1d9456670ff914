"""Select benchmark: data pruning and dataset distillation against random at equal budget.

MNIST-5k (the ingest stage's split: 3,500 train / 1,000 test), the small CNN.
  prune    every pruning method at kept fractions 10/30/50/70/100%, the same epochs over
           the kept set (so equal training steps at equal budget; rs2 and gradnorm_sampling
           see a fresh 10% each epoch), three seeds; time includes the selection cost
           (time-to-accuracy as the RS2 paper counts it).
  noise    10% of the training labels flipped: share of the flipped examples in the top 10%
           of EL2N and forgetting scores, and test accuracy after dropping that top 10%.
  distill  gradient / distribution / trajectory matching at IPC 1, 10, 50 against a random
           real subset of the same size, both trained with one protocol (SGD, DSA).
Rows are appended to benchmarks/results/select_<part>.csv as they finish (``--resume``
skips rows already there); then a table is printed and a plot written.

    python benchmarks/select.py --part prune|noise|distill [--seeds 0 1 2] [--quick]
    python benchmarks/select.py --part distill --methods distribution_matching --csv select_distill_dm.csv \
        --set distribution_matching.iterations=500      # one method per process, in parallel
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # this script shares its name with the standard library's select module

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from slimforge.models import CNNConfig, build_model  # noqa: E402
from slimforge.training import EpochPlan, FitConfig, accuracy, fit  # noqa: E402
from tasks.ingest.config import IngestConfig  # noqa: E402
from tasks.ingest.sources import get_source  # noqa: E402
from tasks.ingest.validate import split_dataset  # noqa: E402
from tasks.select import METHODS  # noqa: E402
from tasks.select.el2n import keep_highest  # noqa: E402
from tasks.select.selection import Plan, SelectContext, Subset  # noqa: E402
from tasks.select.synthetic_init import initial_synthetic  # noqa: E402
from tasks.train.init import initialize  # noqa: E402

OUT = Path(__file__).parent / "results"
ARCH = CNNConfig(channels=[16, 32], hidden=128)
PRUNERS = ["random", "el2n", "grand", "forgetting", "rs2", "gradnorm_sampling"]
SCORED = {"el2n", "grand", "forgetting"}  # one scoring run per seed serves every fraction
DISTILLERS = ["gradient_matching", "distribution_matching", "trajectory_matching"]


def load_mnist5k():
    """(x_train, y_train, x_test, y_test) with the ingest stage's default split (seed 0)."""
    x, y = get_source("mnist5k")(IngestConfig(dataset="mnist5k"))
    split = split_dataset(y, 0.1, 0.2, 0)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)
    tr, te = torch.tensor(split == 0), torch.tensor(split == 2)
    return x[tr], y[tr], x[te], y[te]


def make_model(g: torch.Generator):
    model = build_model(ARCH, (1, 28, 28), 10)
    initialize(model, "kaiming", g)
    return model


def context(x, y, epochs: int, seed: int) -> SelectContext:
    return SelectContext(x=x, y=y, num_classes=10, make_model=make_model, epochs=epochs,
                         generator=torch.Generator().manual_seed(seed))


def train_and_test(x, y, test, cfg: FitConfig, seed: int, plan: EpochPlan | None = None, augment=None) -> float:
    g = torch.Generator().manual_seed(1000 + seed)
    model = make_model(g)
    fit(model, x, y, cfg, g, plan=plan, augment=augment, label=f"eval seed {seed}")
    return accuracy(model, *test)


def _config(method: str, seed: int, **fields):
    cls = METHODS[method].config
    return cls(**{k: v for k, v in {**fields, "seed": seed}.items() if k in cls.model_fields})


def _done(path: Path, resume: bool) -> tuple[list[dict], set]:
    if not (resume and path.exists()):
        return [], set()
    rows = pd.read_csv(path).to_dict("records")
    return rows, {(r["method"], float(r["budget"]), int(r["seed"])) for r in rows}


def _append(path: Path, rows: list[dict], row: dict) -> None:
    rows.append(row)
    pd.DataFrame(rows).to_csv(path, index=False)


def prune_part(data, seeds, fractions, epochs, methods, resume) -> pd.DataFrame:
    x, y, *test = data
    path = OUT / "select_prune.csv"
    rows, done = _done(path, resume)
    fit_cfg = FitConfig(epochs=epochs, batch_size=128)
    for seed in seeds:
        for method in methods:
            scored = None  # (scores, seconds) shared by every fraction of a scored method
            for fraction in fractions:
                if (method, float(fraction), seed) in done:
                    continue
                t0 = time.perf_counter()
                if method in SCORED:
                    if scored is None:
                        sel = METHODS[method].select(context(x, y, epochs, seed), _config(method, seed, keep_fraction=1.0))
                        scored = (sel.scores, time.perf_counter() - t0)
                    sel, select_s = Subset(keep_highest(scored[0], fraction)), scored[1]
                else:
                    sel = METHODS[method].select(context(x, y, epochs, seed),
                                                 _config(method, seed, keep_fraction=fraction))
                    select_s = time.perf_counter() - t0
                t1 = time.perf_counter()
                if isinstance(sel, Plan):
                    acc = train_and_test(x, y, test, fit_cfg, seed, plan=EpochPlan(sel.indices, sel.weights))
                    n = sel.indices.shape[1]
                else:
                    acc = train_and_test(x[sel.kept], y[sel.kept], test, fit_cfg, seed)
                    n = len(sel.kept)
                _append(path, rows, {"method": method, "budget": fraction, "seed": seed, "examples_per_epoch": n,
                                     "test_accuracy": acc, "select_seconds": select_s,
                                     "train_seconds": time.perf_counter() - t1})
                print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def noise_part(data, seeds, epochs, resume) -> pd.DataFrame:
    x, y, *test = data
    path = OUT / "select_noise.csv"
    rows, done = _done(path, resume)
    fit_cfg = FitConfig(epochs=epochs, batch_size=128)
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        flipped = torch.randperm(len(y), generator=g)[: len(y) // 10]
        noisy = y.clone()
        noisy[flipped] = (noisy[flipped] + torch.randint(1, 10, (len(flipped),), generator=g)) % 10
        if ("none", 0.0, seed) not in done:
            _append(path, rows, {"method": "none", "budget": 0.0, "seed": seed, "flipped_in_top": float("nan"),
                                 "test_accuracy": train_and_test(x, noisy, test, fit_cfg, seed)})
        for method in ("el2n", "forgetting"):
            if (method, 0.1, seed) in done:
                continue
            scores = METHODS[method].select(context(x, noisy, epochs, seed), _config(method, seed, keep_fraction=1.0)).scores
            top = keep_highest(scores, 0.1)
            keep = torch.ones(len(y), dtype=torch.bool)
            keep[top] = False
            _append(path, rows, {"method": method, "budget": 0.1, "seed": seed,
                                 "flipped_in_top": float(torch.isin(flipped, top).float().mean()),
                                 "test_accuracy": train_and_test(x[keep], noisy[keep], test, fit_cfg, seed)})
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def eval_protocol(steps: int, n: int) -> tuple[FitConfig, object]:
    """DM's evaluation protocol (SGD 0.01, momentum 0.9, wd 5e-4, batch 256, DSA without flips)
    for ``steps`` SGD steps over ``n`` images: DM trains 1,000 epochs, which at IPC ≤ 10 (one
    batch per epoch) is 1,000 steps; at IPC 50 we keep the steps, not the epochs, equal."""
    from tasks.select import dsa

    epochs = math.ceil(steps / math.ceil(n / 256))
    cfg = FitConfig(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, epochs=epochs, batch_size=256,
                    schedule="cosine")
    return cfg, dsa.batch_augment()


def distill_part(data, seeds, ipcs, methods, eval_steps, overrides, resume, path) -> pd.DataFrame:
    x, y, *test = data
    rows, done = _done(path, resume)
    for seed in seeds:
        for ipc in ipcs:
            fit_cfg, augment = eval_protocol(eval_steps, 10 * ipc)
            if "random_real" in methods and ("random_real", float(ipc), seed) not in done:
                rx, ry = initial_synthetic(x, y, 10, ipc, "real", torch.Generator().manual_seed(seed))
                _append(path, rows, {"method": "random_real", "budget": ipc, "seed": seed, "select_seconds": 0.0,
                                     "iterations": 0,
                                     "test_accuracy": train_and_test(rx, ry, test, fit_cfg, seed, augment=augment)})
                print(rows[-1], flush=True)
            for method in methods:
                if method == "random_real" or (method, float(ipc), seed) in done:
                    continue
                cfg = _config(method, seed, ipc=ipc, **overrides.get(method, {}))
                t0 = time.perf_counter()
                syn = METHODS[method].select(context(x, y, fit_cfg.epochs, seed), cfg)
                select_s = time.perf_counter() - t0
                acc = train_and_test(syn.images.detach(), syn.labels, test, fit_cfg, seed, augment=augment)
                _append(path, rows, {"method": method, "budget": ipc, "seed": seed, "select_seconds": select_s,
                                     "iterations": cfg.iterations, "test_accuracy": acc})
                print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def parse_overrides(items: list[str], methods: list[str], iterations: int | None) -> dict[str, dict]:
    """``["gradient_matching.iterations=20"]`` -> {"gradient_matching": {"iterations": 20}}; values are
    parsed as JSON where they can be (numbers, booleans), else kept as strings."""
    out: dict[str, dict] = {m: ({"iterations": iterations} if iterations else {}) for m in methods}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, field = key.partition(".")
        if not (sep and dot) or method not in DISTILLERS:
            raise SystemExit(f"--set {item!r}: expected METHOD.FIELD=VALUE with METHOD one of {', '.join(DISTILLERS)}")
        if field not in METHODS[method].config.model_fields:
            raise SystemExit(f"--set {item!r}: {method} has no setting {field!r}; valid: "
                             f"{', '.join(METHODS[method].config.model_fields)}")
        try:
            out.setdefault(method, {})[field] = json.loads(value)
        except json.JSONDecodeError:
            out.setdefault(method, {})[field] = value
    return out


def _iterations(df: pd.DataFrame, method: str, budget: float) -> str:
    if "iterations" not in df:
        return ""
    values = df[(df.method == method) & (df.budget == budget)]["iterations"].dropna().unique()
    return "/".join(str(int(v)) for v in sorted(values))


def summarize(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """mean ± std (percent) per method and budget, and the gap to ``baseline`` at that budget."""
    g = df.groupby(["method", "budget"])
    out = g["test_accuracy"].agg(["mean", "std", "count"]).mul([100, 100, 1]).reset_index()
    seconds = [c for c in ("select_seconds", "train_seconds") if c in df]
    if seconds:
        out["seconds"] = g[seconds].mean().sum(axis=1).values  # time-to-accuracy: selection + training
    base = out[out.method == baseline].set_index("budget")["mean"]
    out["vs_" + baseline] = out["mean"] - out["budget"].map(base)
    return out.round(2)


def plot(df: pd.DataFrame, path: Path, xlabel: str, log_x: bool = False) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, part in df.groupby("method"):
        ax.errorbar(part["budget"], part["mean"], yerr=part["std"].fillna(0), marker="o", capsize=3, label=method)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    if log_x:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["prune", "noise", "distill"], required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 1.0])
    ap.add_argument("--ipcs", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--methods", nargs="+")
    ap.add_argument("--epochs", type=int, default=10, help="training epochs over the kept set (prune, noise)")
    ap.add_argument("--eval-steps", type=int, default=1000, help="SGD steps on a synthetic / random real set")
    ap.add_argument("--iterations", type=int, help="override the distillation iterations of every method")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                    help="override one distillation setting, e.g. gradient_matching.iterations=20 (repeatable)")
    ap.add_argument("--csv", help="results file name under benchmarks/results (default select_<part>.csv); "
                                  "runs in parallel write separate files, the table reads all select_distill*.csv")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--resume", action="store_true", help="keep rows already in the CSV")
    ap.add_argument("--quick", action="store_true", help="one seed, fewer budgets: a smoke run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.fractions, args.ipcs, args.epochs, args.eval_steps = [0], [0.1, 1.0], [1], 2, 50
        args.iterations = args.iterations or 20
    OUT.mkdir(parents=True, exist_ok=True)
    data = load_mnist5k()
    pd.set_option("display.width", 160)
    if args.part == "prune":
        df = prune_part(data, args.seeds, args.fractions, args.epochs, args.methods or PRUNERS, args.resume)
        table = summarize(df, "random")
        plot(table, OUT / "select_prune.png", "kept fraction per epoch")
    elif args.part == "noise":
        df = noise_part(data, args.seeds, args.epochs, args.resume)
        table = df.groupby("method")[["flipped_in_top", "test_accuracy"]].agg(["mean", "std"]).mul(100).round(2)
    else:
        methods = args.methods or ["random_real", *DISTILLERS]
        unknown = sorted(set(methods) - {"random_real", *DISTILLERS})
        if unknown:
            raise SystemExit(f"--methods: unknown {', '.join(unknown)}; valid: random_real, {', '.join(DISTILLERS)}")
        overrides = parse_overrides(args.overrides, [m for m in methods if m != "random_real"], args.iterations)
        distill_part(data, args.seeds, args.ipcs, methods, args.eval_steps, overrides, args.resume,
                     OUT / (args.csv or "select_distill.csv"))
        df = pd.concat([pd.read_csv(f) for f in sorted(OUT.glob("select_distill*.csv"))], ignore_index=True)
        df = df.drop_duplicates(["method", "budget", "seed"], keep="last")
        table = summarize(df, "random_real")
        table["iterations"] = table.apply(lambda r: _iterations(df, r.method, r.budget), axis=1)
        plot(table, OUT / "select_distill.png", "images per class", log_x=True)
    print(table.to_string())


if __name__ == "__main__":
    main()
