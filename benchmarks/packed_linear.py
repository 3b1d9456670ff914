"""CPU latency of one Linear layer: fp32 dense vs the quantize stage's packed int8 / int4.

Runs the exact modules the evaluate stage times (quantize_model + load_quantized), so the
figures say whether "smaller" is also "faster" on this machine. Prints a table (ms per call,
median of repeats) and writes benchmarks/results/packed_linear.csv.

    python benchmarks/packed_linear.py [--size 4096] [--batches 1 16 256] [--repeats 20]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from tasks.quantize.packed import load_quantized, packed_layout, quantize_model
from tasks.quantize.rtn import RtnConfig

VARIANTS = {
    "int8 per-channel": RtnConfig(name="int8", bits=8, granularity="channel"),
    "int4 group-128": RtnConfig(name="int4", bits=4, granularity="group", group_size=128),
}


def median_ms(layer: nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(3):
            layer(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            layer(x)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    dense = nn.Sequential(nn.Linear(args.size, args.size))  # quantize_model works on named sub-layers
    with torch.no_grad():
        dense[0].weight.copy_(torch.randn(dense[0].weight.shape, generator=g) / args.size**0.5)
    layers = {"fp32 dense": dense}
    for name, cfg in VARIANTS.items():
        state = quantize_model(dense, cfg)
        layers[name] = load_quantized(copy.deepcopy(dense), state, packed_layout(cfg, state))
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, args.size, generator=g)
        for name, layer in layers.items():
            rows.append({"layer": f"{args.size}x{args.size}", "kernel": name, "batch": batch,
                         "ms": round(median_ms(layer, x, args.repeats), 3), "module": type(layer[0]).__name__})
    df = pd.DataFrame(rows)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    df.to_csv(out / "packed_linear.csv", index=False)
    print(df.pivot(index="batch", columns="kernel", values="ms").to_string())


if __name__ == "__main__":
    main()
