"""Initialization benchmark: every init scheme x {MLP, CNN, tiny ViT} x {MNIST-5k, MNIST-1D}.

Three seeds each, a fixed budget of epochs; test accuracy and the per-epoch training loss
curve. Also: EVA vs random LoRA init on a fine-tuning task (loss curves), and linear decay
vs cosine. Writes benchmarks/results/init*.csv and PNG plots and prints the tables.

    python benchmarks/init.py [--epochs 3] [--seeds 0 1 2] [--quick]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from slimforge.models import CNNConfig, MLPConfig, ViTConfig, build_model  # noqa: E402
from slimforge.training import FitConfig, MaskHold, accuracy, fit  # noqa: E402
from slimforge.transforms import apply_transform  # noqa: E402
from tasks.finetune import FinetuneConfig, TaskSpec  # noqa: E402
from tasks.finetune.finetune import finetune_with_history  # noqa: E402
from tasks.ingest.config import IngestConfig  # noqa: E402
from tasks.ingest.sources import get_source  # noqa: E402
from tasks.ingest.validate import split_dataset  # noqa: E402
from tasks.train.init import initialize  # noqa: E402
from tasks.train.init_config import coerce_init  # noqa: E402

OUT = Path(__file__).parent / "results"
INITS = {
    "kaiming": "kaiming",
    "xavier": "xavier",
    "orthogonal": "orthogonal",
    "gen_gaussian(b=1)": {"scheme": "generalized_gaussian", "beta": 1.0},
    "eff_rank(r=1)": {"scheme": "effective_rank", "rank": 1},
    "eff_rank(r=16)": {"scheme": "effective_rank", "rank": 16},
    "erk(d=0.3)": {"scheme": "erk", "density": 0.3},
}
ARCHS = {
    "mlp": MLPConfig(hidden=[256, 256]),
    "cnn": CNNConfig(channels=[16, 32], hidden=128),
    "vit": ViTConfig(patch=7, width=64, depth=2, heads=4, mlp=128),
}
VIT_1D = ViTConfig(patch=4, width=64, depth=2, heads=4, mlp=128)


def load(name: str):
    """(x_train, y_train, x_test, y_test) with the ingest stage's split (seed 0)."""
    x, y = get_source(name)(IngestConfig(dataset=name))
    split = split_dataset(y, 0.1, 0.2, 0)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)
    tr, te = torch.tensor(split == 0), torch.tensor(split == 2)
    return x[tr], y[tr], x[te], y[te]


def train_once(arch, init, data, fit_cfg: FitConfig, seed: int) -> tuple[float, list[float], float]:
    xtr, ytr, xte, yte = data
    g = torch.Generator().manual_seed(seed)
    model = build_model(arch, tuple(xtr.shape[1:]), 10)
    masks = initialize(model, coerce_init(init), g)
    start = time.perf_counter()
    curve = fit(model, xtr, ytr, fit_cfg, g, hold=MaskHold(model, masks) if masks else None, label="bench")
    return accuracy(model, xte, yte), curve, time.perf_counter() - start


def init_table(epochs: int, seeds: list[int], datasets: list[str]) -> pd.DataFrame:
    rows = []
    for ds in datasets:
        data = load(ds)
        for arch_name, arch in ARCHS.items():
            arch = VIT_1D if (arch_name == "vit" and ds == "mnist1d") else arch
            for init_name, init in INITS.items():
                for seed in seeds:
                    acc, curve, secs = train_once(arch, init, data, FitConfig(epochs=epochs, batch_size=64), seed)
                    rows.append({"dataset": ds, "arch": arch_name, "init": init_name, "seed": seed,
                                 "accuracy": acc, "seconds": secs, **{f"loss_e{i + 1}": v for i, v in enumerate(curve)}})
                    print(f"{ds:8s} {arch_name:4s} {init_name:18s} seed {seed}: {acc:.4f} ({secs:.1f} s)", flush=True)
    return pd.DataFrame(rows)


def schedule_table(epochs: int, seeds: list[int]) -> pd.DataFrame:
    data = load("mnist5k")
    rows = []
    for schedule in ("linear_decay", "cosine", "constant"):
        for seed in seeds:
            cfg = FitConfig(epochs=epochs, batch_size=64, schedule=schedule, warmup_steps=50)
            acc, curve, _ = train_once(ARCHS["cnn"], "kaiming", data, cfg, seed)
            rows.append({"schedule": schedule, "seed": seed, "accuracy": acc, "final_loss": curve[-1]})
    return pd.DataFrame(rows)


def lora_table(epochs: int, seeds: list[int]) -> pd.DataFrame:
    """EVA vs random LoRA init: fine-tune a trained CNN base on rotated digits (rot90)."""
    xtr, ytr, xte, yte = load("mnist5k")
    rows = []
    for seed in seeds:
        g = torch.Generator().manual_seed(100 + seed)
        base = build_model(ARCHS["cnn"], tuple(xtr.shape[1:]), 10)
        initialize(base, "kaiming", g)
        fit(base, xtr, ytr, FitConfig(epochs=2, batch_size=64), g, label="base")
        task_x, task_xte = apply_transform("rotate90", xtr), apply_transform("rotate90", xte)
        for lora_init in ("random", "eva"):
            cfg = FinetuneConfig(method="lora", lora_init=lora_init, lora_rank=4, epochs=epochs, lr=3e-3,
                                 batch_size=64, tasks=[TaskSpec(name="rot90", transform="rotate90")])
            model, curve = finetune_with_history(base, task_x, ytr, cfg, torch.Generator().manual_seed(seed))
            rows.append({"lora_init": lora_init, "seed": seed, "accuracy": accuracy(model, task_xte, yte),
                         **{f"loss_e{i + 1}": v for i, v in enumerate(curve)}})
    return pd.DataFrame(rows)


def summarize(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    g = df.groupby(keys)["accuracy"]
    return pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n": g.count()}).round(4)


def plot_curves(df: pd.DataFrame, path: Path) -> None:
    loss_cols = [c for c in df.columns if c.startswith("loss_e")]
    panels = list(df.groupby(["dataset", "arch"]))
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), squeeze=False)
    for ax, ((ds, arch), part) in zip(axes.flat, panels, strict=False):
        for init, rows in part.groupby("init"):
            curve = rows[loss_cols].mean().to_numpy()
            ax.plot(np.arange(1, len(curve) + 1), curve, marker="o", label=init)
        ax.set_title(f"{ds} / {arch}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("train loss (mean of seeds)")
        ax.set_yscale("log")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--datasets", nargs="+", default=["mnist5k", "mnist1d"])
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    df = init_table(args.epochs, args.seeds, args.datasets)
    df.to_csv(OUT / "init.csv", index=False)
    plot_curves(df, OUT / "init_curves.png")
    print("\ntest accuracy after", args.epochs, "epochs (mean, std over seeds)")
    print(summarize(df, ["dataset", "arch", "init"]).unstack(["dataset", "arch"]).to_string())
    lora = lora_table(args.epochs, args.seeds)
    lora.to_csv(OUT / "lora_init.csv", index=False)
    print("\nLoRA init on rot90 (CNN base, rank 4): test accuracy and mean loss per epoch")
    print(lora.groupby("lora_init").mean(numeric_only=True).drop(columns="seed").round(4).to_string())
    sched = schedule_table(args.epochs, args.seeds)
    sched.to_csv(OUT / "schedules.csv", index=False)
    print("\nschedules (CNN, MNIST-5k)")
    print(summarize(sched, ["schedule"]).to_string())


if __name__ == "__main__":
    main()
