"""Merge benchmark: K task models from one base, merged by every method, judged per task.

Data: MNIST-5k with the ingest stage's default split (train / val / test). The base is the
small CNN trained on clean digits (benchmarks/prune.py's recipe); each of ``--tasks`` (default
8: rotations by 90/180/270°, horizontal and vertical flips, the photographic negative, a 3×3
blur and additive noise) is a full fine-tune of the base on transformed train images with its
own head (the finetune stage's own function). Every method then merges the K backbones through
the stage's own runners (``tasks.merge.runners``: λ and q grids and greedy choices on the
validation split; AdaMerging on the *unlabelled* validation inputs, and once with the labelled
cross-entropy objective of Self Positioning) and each task is scored on the test split with its
own head.

Reported per method: per-task test accuracy, the mean, and the normalized average
(mean over tasks of merged accuracy / fine-tuned accuracy, the FusionBench measure), with the
base (its backbone under each task's head) and the individual fine-tunes as references; merge
wall time. Merge ↔ quantize compares, at 4-bit RTN (groups of 32), quantizing the merged
backbone with merging quantized checkpoints (base and fine-tunes each quantized, merged after
dequantization), both with TIES. Rows go to ``<out>/merge.csv``, a markdown table to stdout, and
``merge.png`` shows normalized accuracy per method.

    python -m benchmarks.merge [--tasks rotate90 ...] [--seeds 0] [--epochs 8] [--ft-epochs 3]
        [--steps 500] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import torch

from benchmarks.prune import train_base
from slimforge.transforms import RELABELS, task_data
from tasks.finetune.config import FinetuneConfig, TaskSpec
from tasks.finetune.finetune import finetune
from tasks.ingest.config import IngestConfig
from tasks.ingest.sources import get_source
from tasks.ingest.validate import split_dataset
from tasks.merge.adamerging import AdaMergingConfig
from tasks.merge.runners import RUNNERS, TaskSet
from tasks.merge.soup import AverageConfig, GreedySoupConfig
from tasks.merge.task_arithmetic import TaskVectorConfig
from tasks.quantize.rtn import RtnConfig, fake_quantize

OUT = Path(__file__).parent / "results"
TASKS = ["rotate90", "hflip", "invert", "blur", "parity", "mod3", "high", "prime"]
QUANT = RtnConfig(name="int4", bits=4, granularity="group", group_size=32)
QUANT_CHANNEL = RtnConfig(name="int4", bits=4, granularity="channel")  # K not a multiple of 32 (first conv)


def methods(steps: int) -> dict:
    return {"average": AverageConfig(), "greedy_soup": GreedySoupConfig(),
            "task_arithmetic": TaskVectorConfig(),
            "ties": TaskVectorConfig(method="ties", lambdas=[0.4, 0.6, 0.8, 1.0, 1.2, 1.5]),
            "dare": TaskVectorConfig(method="dare", drop=0.9),
            "dare_ties": TaskVectorConfig(method="dare", drop=0.9, consensus="ties",
                                          lambdas=[0.4, 0.6, 0.8, 1.0, 1.2, 1.5]),
            "adamerging_task": AdaMergingConfig(granularity="task", steps=steps),
            "adamerging_layer": AdaMergingConfig(granularity="layer", steps=steps),
            "adamerging_layer_labelled": AdaMergingConfig(granularity="layer", steps=steps,
                                                          objective="cross_entropy")}


def load_splits():
    x, y = get_source("mnist5k")(IngestConfig(dataset="mnist5k"))
    split = torch.tensor(split_dataset(y, 0.1, 0.2, 0))
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)
    return [(x[split == s], y[split == s]) for s in (0, 1, 2)]


def spec(task: str) -> TaskSpec:
    return TaskSpec(name=task, relabel=task) if task in RELABELS else TaskSpec(name=task, transform=task)


def task_models(base, tasks: list[str], x, y, epochs: int, seed: int) -> list:
    cfg = FinetuneConfig(tasks=[spec(t) for t in tasks], epochs=epochs)
    return [finetune(base, *task_data(s.transform, s.relabel, x, y), cfg,
                     torch.Generator().manual_seed(seed * 1000 + k), label=f"finetune {s.name}")
            for k, s in enumerate(cfg.tasks)]


def test_accuracies(ts: TaskSet, backbone: dict, test) -> list[float]:
    """Each task's accuracy on the test split: the TaskSet's own scoring, on other data."""
    xt, yt = test
    return dataclasses.replace(ts, x_val=xt, y_val=yt, _probe=None).accuracies(backbone)


def quantized(state: dict) -> dict:
    """4-bit RTN of every weight matrix/kernel (reshaped to (N, K)); vectors stay float."""
    def rtn(w):
        matrix = w.reshape(w.shape[0], -1)
        return fake_quantize(matrix, QUANT if matrix.shape[1] % 32 == 0 else QUANT_CHANNEL).reshape(w.shape)

    return {k: rtn(v) if v.dim() > 1 else v for k, v in state.items()}


def row(method, seed, accs, reference, seconds, extra=None) -> dict:
    norm = sum(a / r for a, r in zip(accs, reference, strict=True)) / len(accs)
    return {"method": method, "seed": seed, "mean_accuracy": sum(accs) / len(accs), "normalized": norm,
            "seconds": seconds, **{f"acc_{k}": a for k, a in enumerate(accs)}, **(extra or {})}


def run_seed(args, seed: int, splits) -> list[dict]:
    (x, y), (xv, yv), test = splits
    train = {"epochs": args.epochs, "batch_size": 128, "optimizer": "adamw", "lr": 1e-3}
    base, _ = train_base("cnn", x, y, seed, train)
    models = task_models(base, args.tasks, x, y, args.ft_epochs, seed)
    specs = [spec(t) for t in args.tasks]
    ts = TaskSet(names=args.tasks, transforms=[s.transform for s in specs], relabels=[s.relabel for s in specs],
                 template=base, base=dict(base.backbone.state_dict()),
                 finetuned=[dict(m.backbone.state_dict()) for m in models],
                 heads=[dict(m.head.state_dict()) for m in models], x_val=xv, y_val=yv)
    finetuned = [test_accuracies(ts, ft, test)[k] for k, ft in enumerate(ts.finetuned)]
    rows = [row("base", seed, test_accuracies(ts, ts.base, test), finetuned, 0.0),
            row("finetuned", seed, finetuned, finetuned, 0.0)]
    for name, cfg in methods(args.steps).items():
        start = time.perf_counter()
        merged, report = RUNNERS[cfg.method](ts, cfg)
        rows.append(row(name, seed, test_accuracies(ts, merged, test), finetuned, time.perf_counter() - start,
                        {"lambda": report.get("lambda")}))
        print(f"  {name}: normalized {rows[-1]['normalized']:.3f}", flush=True)
    rows += merge_quantize(ts, seed, finetuned, test)
    return rows


def merge_quantize(ts: TaskSet, seed: int, finetuned: list[float], test) -> list[dict]:
    """TIES then 4-bit RTN, versus TIES of 4-bit checkpoints (base and fine-tunes quantized)."""
    ties = TaskVectorConfig(method="ties", lambdas=[0.4, 0.6, 0.8, 1.0, 1.2, 1.5])
    merged, _ = RUNNERS["ties"](ts, ties)
    rows = [row("ties->int4", seed, test_accuracies(ts, quantized(merged), test), finetuned, 0.0)]
    qts = TaskSet(names=ts.names, transforms=ts.transforms, relabels=ts.relabels, template=ts.template,
                  base=quantized(ts.base),
                  finetuned=[quantized(f) for f in ts.finetuned], heads=ts.heads, x_val=ts.x_val, y_val=ts.y_val)
    merged_q, _ = RUNNERS["ties"](qts, ties)
    rows.append(row("int4->ties", seed, test_accuracies(ts, merged_q, test), finetuned, 0.0))
    return rows


def summarize(df: pd.DataFrame, out: Path) -> str:
    table = df.groupby("method", sort=False)[["mean_accuracy", "normalized", "seconds"]].agg(["mean", "std"])
    fig, ax = plt.subplots(figsize=(8, 4))
    means = df.groupby("method", sort=False).normalized.mean()
    ax.bar(means.index, means.values, color="tab:blue")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_ylabel("normalized accuracy (merged / fine-tuned)")
    ax.set_ylim(max(0.0, float(means.min()) - 0.1), 1.05)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(out / "merge.png", dpi=120)
    plt.close(fig)
    return table.round(4).to_markdown()


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=TASKS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--ft-epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=500, help="AdaMerging steps")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--quick", action="store_true", help="smoke run: first and last task, 1 epoch, 5 AdaMerging steps")
    args = p.parse_args(argv)
    if args.quick:
        args.tasks, args.epochs, args.ft_epochs, args.steps = args.tasks[:1] + args.tasks[-1:], 1, 1, 5
    args.out.mkdir(parents=True, exist_ok=True)
    splits = load_splits()
    if args.quick:
        splits = [(x[:600], y[:600]) for x, y in splits]
    rows = []
    for seed in args.seeds:
        rows += run_seed(args, seed, splits)
        pd.DataFrame(rows).to_csv(args.out / "merge.csv", index=False)
    df = pd.DataFrame(rows)
    print(f"tasks: {', '.join(args.tasks)}")
    print(summarize(df, args.out))
    return df


if __name__ == "__main__":
    main()
