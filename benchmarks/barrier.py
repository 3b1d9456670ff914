"""Barrier benchmark: loss barrier between two independently trained MLPs, before and after weight matching.

Git Re-Basin (Ainsworth et al., ICLR 2023) at MNIST-5k scale: per pair, two MLPs 784-512-512-10
(``--width``, ``--depth``) trained on the ingest stage's train split (3,500 images) from different
seeds, so both the init and the batch order differ (AdamW, ``--epochs``, lr ``--lr``, batch 128).
B is aligned to A with ``tasks.merge.weight_matching`` (Algorithm 1, layer order from a seeded
generator); then loss and accuracy are measured at ``--points`` α in [0, 1] along
θ(α) = (1 − α)·θ_A + α·θ_B, once with B as trained ("naive") and once with the aligned B, on the
train and the test split (1,000 images). The loss barrier (Entezari et al. 2022, Def. 1) is
max_α L(θ(α)) − [(1 − α)·L(θ_A) + α·L(θ_B)]; the issue's target is aligned ≤ ½ · naive.

Writes ``<out>/barrier.csv`` (one row per pair, curve, split, α), ``<out>/barrier_summary.csv``
(barriers per pair and split) and ``<out>/barrier.png`` (the first pair's curves), and prints
the summary as a markdown table.

    python -m benchmarks.barrier [--pairs 3] [--width 512] [--depth 2] [--epochs 30] [--points 11] [--quick]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from benchmarks.select import load_mnist5k
from slimforge.models import MLPConfig, build_model
from slimforge.training import FitConfig, fit
from tasks.merge.barrier import (
    accuracy_barrier,
    classifier_evaluator,
    interpolation_curve,
    loss_barrier,
    plot_barrier,
)
from tasks.merge.weight_matching import apply_permutation, match_weights, permutation_spec
from tasks.train.init import initialize

OUT = Path(__file__).parent / "results"
SHAPE, CLASSES = (1, 28, 28), 10


def train_mlp(arch: MLPConfig, seed: int, x, y, args) -> torch.nn.Module:
    """One MLP; ``seed`` draws its Kaiming init and then its batch order."""
    g = torch.Generator().manual_seed(seed)
    model = build_model(arch, SHAPE, CLASSES)
    initialize(model, "kaiming", g)
    fit(model, x, y, FitConfig(optimizer="adamw", lr=args.lr, epochs=args.epochs, batch_size=128), g,
        label=f"mlp seed {seed}")
    return model


def l2_distance(a: dict, b: dict) -> float:
    return sum((a[k] - b[k]).double().pow(2).sum().item() for k in a) ** 0.5


def run_pair(pair: int, arch: MLPConfig, data, args) -> tuple[list[dict], dict, dict]:
    """Curve rows, summary rows per split and the curves to plot, for seeds (2·pair, 2·pair + 1)."""
    x, y, x_test, y_test = data
    seeds = (2 * pair, 2 * pair + 1)
    a, b = (train_mlp(arch, s, x, y, args).state_dict() for s in seeds)
    spec = permutation_spec(build_model(arch, SHAPE, CLASSES))
    start = time.perf_counter()
    perms = match_weights(spec, a, b, args.max_sweeps, torch.Generator().manual_seed(pair))
    match_s = time.perf_counter() - start
    aligned = apply_permutation(spec, perms, b)
    alphas = [i / (args.points - 1) for i in range(args.points)]
    rows, summary, curves = [], {}, {}
    for split, (xs, ys) in {"train": (x, y), "test": (x_test, y_test)}.items():
        evaluate = classifier_evaluator(build_model(arch, SHAPE, CLASSES), xs, ys)
        naive = interpolation_curve(a, b, evaluate, alphas)
        matched = interpolation_curve(a, aligned, evaluate, alphas)
        for name, curve in (("naive", naive), ("aligned", matched)):
            rows += [{"pair": pair, "seed_a": seeds[0], "seed_b": seeds[1], "curve": name, "split": split, **p}
                     for p in curve]
            curves[f"{name} ({split})"] = curve
        mid = len(alphas) // 2
        summary[split] = {
            "pair": pair, "split": split,
            "acc_A": naive[0]["accuracy"], "acc_B": naive[-1]["accuracy"],
            "loss_barrier_naive": loss_barrier(naive), "loss_barrier_aligned": loss_barrier(matched),
            "ratio": loss_barrier(matched) / loss_barrier(naive),
            "acc_barrier_naive_pts": 100 * accuracy_barrier(naive),
            "acc_barrier_aligned_pts": 100 * accuracy_barrier(matched),
            f"acc_mid_naive (α={alphas[mid]:.2f})": naive[mid]["accuracy"],
            "acc_mid_aligned": matched[mid]["accuracy"],
            "dloss_at_B": abs(matched[-1]["loss"] - naive[-1]["loss"]),  # aligned B computes what B does: ≈ 0
            "l2_naive": l2_distance(a, b), "l2_aligned": l2_distance(a, aligned), "match_s": match_s,
        }
    return rows, summary, curves


def mean_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per split: 'mean ± std' over pairs of the barriers and their ratio (aligned / naive)."""
    cols = ["loss_barrier_naive", "loss_barrier_aligned", "ratio", "acc_barrier_naive_pts", "acc_barrier_aligned_pts"]
    stats = table.groupby("split", sort=False)[cols].agg(["mean", "std"]).fillna(0.0)
    return pd.DataFrame({c: [f"{m:.4f} ± {s:.4f}" for m, s in zip(stats[c]["mean"], stats[c]["std"], strict=True)]
                         for c in cols}, index=stats.index)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3, help="independent model pairs (seeds 2k and 2k+1)")
    ap.add_argument("--width", type=int, default=512, help="hidden units per layer")
    ap.add_argument("--depth", type=int, default=2, help="hidden layers")
    ap.add_argument("--epochs", type=int, default=30, help="AdamW epochs of each model (train loss ≈ 0 by 30)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--points", type=int, default=11, help="α values in [0, 1], endpoints included")
    ap.add_argument("--max-sweeps", type=int, default=100, help="weight-matching sweeps, at most")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=OUT, help="directory of barrier.csv, barrier_summary.csv, barrier.png")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 pair of 784-32-32-10 MLPs, 1 epoch")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.pairs, args.width, args.epochs = 1, 32, 1
    if args.points < 3:
        ap.error("--points must be at least 3 (both endpoints and one α between)")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    arch, data = MLPConfig(hidden=[args.width] * args.depth), load_mnist5k()
    rows, summary = [], []
    for pair in range(args.pairs):
        pair_rows, pair_summary, curves = run_pair(pair, arch, data, args)
        rows += pair_rows
        summary += pair_summary.values()
        if pair == 0:
            plot_barrier(curves, args.out / "barrier.png")
        test = pair_summary["test"]
        print(f"pair {pair}: test loss barrier {test['loss_barrier_naive']:.4f} naive, "
              f"{test['loss_barrier_aligned']:.4f} aligned (ratio {test['ratio']:.3f})", flush=True)
    pd.DataFrame(rows).to_csv(args.out / "barrier.csv", index=False)
    table = pd.DataFrame(summary)
    table.to_csv(args.out / "barrier_summary.csv", index=False)
    print(f"\n### MLP 784-{'-'.join([str(args.width)] * args.depth)}-10, MNIST-5k, {args.epochs} epochs, "
          f"{args.pairs} pair(s), {args.points} α points\n")
    print(table.round(4).to_markdown(index=False))
    print(f"\nmean ± std over {args.pairs} pair(s):\n")
    print(mean_table(table).to_markdown())
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
