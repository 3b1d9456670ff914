"""CPU latency of one Linear layer: fp32 dense vs the quantize stage's packed int8 / int4 / W8A8.

Runs the exact modules the evaluate stage times (quantize_model + load_quantized), so the
figures say whether "smaller" is also "faster" on this machine. Prints a table (ms per call,
median of repeats) and writes benchmarks/results/packed_linear.csv.

Rows: fp32 dense; weight-only int8 and int4 (``Int8Linear`` / ``Int4CpuLinear``, which cast
activations to bf16 around torch's packed ops), plus the int8 op fed fp32 activations
directly (the slow path the bf16 cast avoids); SmoothQuant W8A8 (``W8A8Linear``) with
per-tensor and per-token activations on fbgemm's dynamic int8 Linear (``kernel: auto``), and
per-token on the exact torch reference (``kernel: torch``; torch's ``_int_mm`` is slower still).

    python -m benchmarks.packed_linear [--size 4096] [--batches 1 16 256] [--repeats 20] [--threads 1]

(as a module: run as a script, benchmarks/select.py would shadow the stdlib's ``select``).
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
from tasks.quantize.smoothquant import SmoothQuantConfig

SQ_TOKEN = SmoothQuantConfig(name="w8a8", method="smoothquant")
VARIANTS = {  # name: (config, kernel setting of load_quantized)
    "int8 w-only (bf16 act)": (RtnConfig(name="int8", bits=8, granularity="channel"), "auto"),
    "int4 g128 w-only (bf16 act)": (RtnConfig(name="int4", bits=4, granularity="group", group_size=128), "auto"),
    "W8A8 per-tensor (fbgemm)": (SmoothQuantConfig(name="w8a8t", method="smoothquant", activations="per_tensor"),
                                 "auto"),
    "W8A8 per-token (fbgemm)": (SQ_TOKEN, "auto"),
    "W8A8 per-token (torch reference)": (SQ_TOKEN, "torch"),
}


class Int8OpFp32(nn.Module):
    """torch's int8 weight-only op fed fp32 activations, as the issue's note warns against."""

    def __init__(self, packed: nn.Module):
        super().__init__()
        self.packed = packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.packed.weight_int8, self.packed.scales) + self.packed.bias


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
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    dense = nn.Sequential(nn.Linear(args.size, args.size))  # quantize_model works on named sub-layers
    with torch.no_grad():
        dense[0].weight.copy_(torch.randn(dense[0].weight.shape, generator=g) / args.size**0.5)
    layers = {"fp32 dense": dense}
    calib = torch.randn(64, args.size, generator=g)  # SmoothQuant's activation maxima
    for name, (cfg, kernel) in VARIANTS.items():
        state = quantize_model(dense, cfg, calib)
        layers[name] = load_quantized(copy.deepcopy(dense), state, packed_layout(cfg, state), kernel)
    layers["int8 w-only (fp32 act into op)"] = nn.Sequential(Int8OpFp32(layers["int8 w-only (bf16 act)"][0]))
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
    table = df.pivot(index="batch", columns="kernel", values="ms")[list(layers)]
    print(f"ms per call, {args.size}x{args.size}, {torch.get_num_threads()} threads")
    print(table.T.to_string())
    print("speedup vs fp32 dense")
    print((table.rdiv(table["fp32 dense"], axis=0)).round(2).T.to_string())


if __name__ == "__main__":
    main()
