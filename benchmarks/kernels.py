"""Kernel benchmark: the shared kernels against torch's dense ops and against the memory limit.

For the weight shapes of a LLaMA-7B block (K×N = in×out features: 4096×4096, 4096×11008 and
11008×4096) and batches 1, 16, 64 and 256, it times every matmul kernel of ``kernels/``
against the dense matmul and reports ms per call, speedup, bytes moved (weights +
activations + output, each read or written once) and the achieved bandwidth as a share of
the device's peak. Every kernel computes the same weights (the int4 codes' dequantized matrix,
and its per-channel int8 rounding for W8A8), so each row also gives the SQNR of its output
against the dense one: a fast kernel with a wrong answer shows. It does the same for the fused
task-vector merge (K task vectors of one 11008×4096 matrix on a GPU, 4M entries on CPU:
bytes = (K + 2)·n·4) and for one QAT training step (forward, backward,
AdamW) of an MLP whose weights are fake-quantized by the fused kernel, against the same step
without fake-quant.

On a GPU the baseline is torch's fp16 matmul and the kernels are the Triton ones (plus 2:4
semi-structured sparse and the unfused torch paths, for comparison). On CPU there is no
Triton kernel to time: it reports the torch reference paths and torch's packed int8/int4 CPU
ops against the fp32 matmul, so the table says what a CPU user gets.

    python -m benchmarks.kernels [--shapes 4096x4096 ...] [--batches 1 16 64 256] [--peak-gbps G]
                                 [--merge-tasks 2 4 8] [--qat-tokens 8192] [--sections matmul merge qat]
                                 [--kernel auto|torch|triton] [--warm-cache] [--quick]

Writes benchmarks/results/kernels.csv, kernels.md and kernels.png. Timings are medians; on a
GPU they come from ``triton.testing.do_bench``, which flushes the L2 cache between calls so a
4096×4096 int4 weight (8 MiB) is really read from memory. On CPU the matmuls are timed the same
way (the last-level cache flushed before each call) unless ``--warm-cache``: an 8 MiB int4 or
16 MiB int8 weight fits a 32 MiB L3, and back-to-back calls then read it from there, which
flatters every low-bit row several-fold against the 64 MiB fp32 weight that never fits.

On CPU the low-bit rows are torch's packed ops (weight-only int8 and int4, bf16 activations),
fbgemm's W8A8 (``kernels.cpu.int8_dynamic_matmul``, per-token) and onnxruntime's W4A8
MatMulNBits (``kernels.cpu_w4a8``, the ``[cpu]`` extra).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import cpu as cpu_ops
from kernels.cpu_w4a8 import prepare_w4a8_cpu, w4a8_available, w4a8_matmul, w4a8_session
from kernels.int4 import dequantize_int4, pack_int4
from kernels.sparse24 import Sparse24Linear, semi_structured_supported
from tasks.quantize.qat_quantizers import LsqQuantizer
from tasks.quantize.rtn import GridConfig

RESULTS = Path(__file__).parent / "results"
GROUP = 128
PEAK_GBPS = {"H100 80GB HBM3": 3350, "H100 SXM": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800,
             "A100-SXM4-80GB": 2039, "A100-PCIE-80GB": 1935, "A100-SXM4-40GB": 1555, "L4": 300, "A10G": 600}


def peak_gbps(device: torch.device, given: float | None) -> float | None:
    """The device's peak memory bandwidth in GB/s: given, from the GPU's name, else unknown (None)."""
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((gbps for key, gbps in PEAK_GBPS.items() if key in name), None)


def last_level_cache_bytes() -> int:
    """The CPU's largest cache in bytes, from sysfs (64 MiB where it cannot be read)."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KM")) * scale)
    return max(sizes, default=64 << 20)


@functools.cache
def _flush_buffer() -> torch.Tensor:
    return torch.ones(2 * last_level_cache_bytes() // 4)  # twice the last-level cache, fp32


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, cold: bool = False) -> float:
    """Median wall time of ``fn`` in ms (GPU: do_bench with L2 flushes; CPU: perf_counter).

    ``cold`` on CPU reads a buffer twice the last-level cache before every timed call (reading
    leaves no dirty lines to write back during the call), so a weight that would fit the cache
    (a 4096×4096 int4 matrix is 8 MiB) is fetched from memory as in a model too large to stay
    cached; do_bench does the same for the GPU's L2.
    """
    if device.type == "cuda":
        import triton.testing  # GPU runs have the triton extra

        return float(triton.testing.do_bench(fn, warmup=10, rep=max(25, repeats), return_mode="median"))
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if cold:
            _flush_buffer().max()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def gemm_cases(k: int, n: int, m: int, device: torch.device, impl: str,
               gen: torch.Generator) -> dict[str, tuple[Callable, int]]:
    """name -> (call, bytes it must move at least) for one (M, K) × (K, N) product."""
    gpu = device.type == "cuda"
    dtype = torch.float16 if gpu else torch.float32
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, k // GROUP, generator=gen) * 0.02 + 0.001).to(dtype)
    zeros = torch.full((n, k // GROUP), 8.0, dtype=dtype)
    packed = pack_int4(codes)
    w = dequantize_int4(packed, scales, zeros, GROUP).to(dtype)  # (N, K): the same weights, dense
    w_s = w.float().abs().amax(dim=1) / 127  # (N,) per-channel int8 of the same weights
    w_q = torch.round(w.float() / w_s[:, None]).clamp(-127, 127).to(torch.int8)
    x = torch.randn(m, k, generator=gen).to(dtype)
    packed, scales, zeros, w, w_q, w_s, x = (t.to(device) for t in (packed, scales, zeros, w, w_q, w_s, x))
    io = (m * k + m * n) * x.element_size()  # activations in, output out
    int4_bytes = n * k // 2 + 2 * scales.numel() * scales.element_size()
    cases = {
        f"{'fp16' if gpu else 'fp32'} dense (torch)": (lambda: F.linear(x, w), w.numel() * w.element_size() + io),
        f"W4A16 g{GROUP} ({impl})": (lambda: kernels.w4a16_matmul(x, packed, scales, zeros, GROUP, kernel=impl),
                                    int4_bytes + io),
        f"W8A8 per-token ({impl})": (lambda: kernels.w8a8_matmul(*kernels.quantize_activations(x, kernel=impl),
                                                                 w_q, w_s, out_dtype=x.dtype, kernel=impl),
                                    n * k + 4 * n + io),
    }
    if gpu and semi_structured_supported(device):
        layer = nn.Linear(k, n, bias=False, dtype=dtype, device=device)
        with torch.no_grad():  # keep the 2 largest of every 4 inputs: a 2:4 weight
            keep = w.abs().view(n, k // 4, 4).topk(2, dim=-1).indices
            layer.weight.copy_(torch.zeros_like(w).view(n, k // 4, 4).scatter(-1, keep, 1.0).view(n, k) * w)
        sparse = Sparse24Linear.from_linear(layer, "auto")
        cases["2:4 sparse fp16 (semi-structured)"] = (lambda: sparse(x), n * k + n * k // 8 + io)
    if not gpu:  # torch's packed CPU ops: the real low-bit kernels a CPU user gets, bf16 activations
        xb = x.to(torch.bfloat16)
        if cpu_ops.int8_bf16_ok(k):
            w8, s8 = w_q, w_s.to(torch.bfloat16)
            cases["int8 w-only packed (torch CPU op)"] = (lambda: cpu_ops.int8_weight_matmul(xb, w8, s8),
                                                          n * k + 2 * n + io // 2)
        if cpu_ops.supports_int4_cpu(n, k, GROUP):
            p4, sz4 = cpu_ops.prepare_int4_cpu(codes, scales.float(), zeros.float(), GROUP)
            cases[f"int4 g{GROUP} w-only packed (torch CPU op)"] = (
                lambda: cpu_ops.int4_weight_matmul(xb, p4, sz4, GROUP), int4_bytes + io // 2)
        if cpu_ops.int8_dynamic_available():
            w8d = cpu_ops.prepare_int8_dynamic(w_q, w_s)
            cases["W8A8 per-token (fbgemm CPU op)"] = (
                lambda: cpu_ops.int8_dynamic_matmul(x, w8d, per_token=True), n * k + 4 * n + io)
        if w4a8_available():  # onnxruntime's int4 × int8 MatMulNBits, activations int8 per block of GROUP
            session = w4a8_session(prepare_w4a8_cpu(codes, scales.float(), zeros.float(), GROUP), k, GROUP,
                                   torch.get_num_threads())
            cases[f"W4A8 g{GROUP} (onnxruntime CPU op)"] = (lambda: w4a8_matmul(x, session), int4_bytes + io)
    return cases


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """10·log10(‖ref‖² / ‖ref − out‖²) in float64."""
    ref, out = ref.double(), out.double()
    noise = (ref - out).pow(2).sum()
    return float("inf") if noise == 0 else round(10 * torch.log10(ref.pow(2).sum() / noise).item(), 1)


def gemm_rows(args, device: torch.device, peak: float | None) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for k, n in args.shapes:
        for m in args.batches:
            cases = gemm_cases(k, n, m, device, args.impl, gen)
            base_ms, dense = None, None
            for name, (fn, nbytes) in cases.items():
                with torch.inference_mode():
                    out = fn()
                    ms = median_ms(fn, device, args.repeats, cold=not args.warm_cache)
                base_ms, dense = base_ms or ms, dense if dense is not None else out
                r = row("matmul", f"{k}x{n}", m, name, ms, base_ms, nbytes, peak)
                r["SQNR dB vs dense"] = None if "2:4" in name else sqnr_db(dense, out)
                rows.append(r)
    return rows


def row(section: str, shape: str, batch: int, kernel: str, ms: float, base_ms: float, nbytes: int,
        peak: float | None) -> dict:
    gbps = nbytes / ms / 1e6
    return {"section": section, "shape": shape, "batch": batch, "kernel": kernel, "ms": round(ms, 4),
            "speedup": round(base_ms / ms, 2), "MB moved": round(nbytes / 1e6, 2), "GB/s": round(gbps, 1),
            "peak share": round(gbps / peak, 3) if peak else None}


def merge_rows(args, device: torch.device, peak: float | None) -> list[dict]:
    """The fused TIES/DARE merge of K task vectors against its unfused torch reference."""
    n = args.merge_entries or (11008 * 4096 if device.type == "cuda" else 1 << 22)
    gen = torch.Generator().manual_seed(1)
    modes = {"ties": {"density": 0.2, "drop": 0.0, "elect": True},
             "dare": {"density": None, "drop": 0.9, "elect": False},
             "dare+ties": {"density": None, "drop": 0.9, "elect": True}}
    rows = []
    for k in args.merge_tasks:
        w0 = torch.randn(n, generator=gen).to(device)
        deltas = (torch.randn(k, n, generator=gen) * 0.01).to(device)
        seeds = torch.arange(k, dtype=torch.int64)
        for mode, opts in modes.items():
            thresholds = (torch.quantile(deltas[:, :1 << 20].abs().float().cpu(), 1 - opts["density"], dim=1)
                          if opts["density"] else None)
            nbytes = (k + 2) * n * 4  # K task vectors and θ₀ read, θ written
            call = functools.partial(kernels.task_vector_merge, w0, deltas, 0.5, thresholds=thresholds,
                                     drop=opts["drop"], seeds=seeds if opts["drop"] else None, elect=opts["elect"])
            ref_ms = median_ms(functools.partial(call, kernel="torch"), device, args.repeats)
            rows.append(row("merge", f"K={k}, n={n}", k, f"{mode} (torch reference)", ref_ms, ref_ms, nbytes, peak))
            if args.impl == "triton":
                ms = median_ms(functools.partial(call, kernel="triton"), device, args.repeats)
                fused = row("merge", f"K={k}, n={n}", k, f"{mode} (triton, fused)", ms, ref_ms, nbytes, peak)
                fused["max |diff| vs torch"] = (call(kernel="triton") - call(kernel="torch")).abs().max().item()
                rows.append(fused)
    return rows


def qat_rows(args, device: torch.device) -> list[dict]:
    """One AdamW training step of an MLP, fp vs LSQ 4-bit g128 fake-quant (fused kernel, and torch)."""
    width, layers, tokens = args.qat_width, args.qat_layers, args.qat_tokens
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, width, generator=gen).to(device)
    target = torch.randn(tokens, width, generator=gen).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    results = {}
    for variant in ("fp", "lsq torch", "lsq fused"):
        torch.manual_seed(0)
        model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.GELU())]).to(device)
        if variant != "fp":
            kernel = "torch" if variant == "lsq torch" else args.impl
            for layer in model:
                if isinstance(layer, nn.Linear):
                    quantizer = LsqQuantizer(layer.weight, GridConfig(name="w4g128", method="qat", bits=4, granularity="group", group_size=GROUP),
                                             kernel=kernel).to(device)
                    nn.utils.parametrize.register_parametrization(layer, "weight", quantizer)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            with autocast:
                loss = F.mse_loss(model(x).float(), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        results[variant] = median_ms(step, device, args.repeats)
    shape = f"{layers}×Linear({width}), {tokens} tokens"
    return [{"section": "qat step", "shape": shape, "batch": tokens, "kernel": v, "ms": round(ms, 3),
             "speedup": round(results["fp"] / ms, 3), "step cost vs fp": round(ms / results["fp"], 3)}
            for v, ms in results.items()]


def plot(df: pd.DataFrame, path: Path) -> None:
    mm = df[df.section == "matmul"]
    shapes = list(dict.fromkeys(mm["shape"]))
    if not shapes:
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False, sharey=True)
    for ax, shape in zip(axes[0], shapes, strict=True):
        sub = mm[mm["shape"] == shape].pivot(index="batch", columns="kernel", values="speedup")
        sub.plot(ax=ax, marker="o", logx=True)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(title=f"K×N = {shape}", xlabel="batch", ylabel="speedup over dense")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_shape(text: str) -> tuple[int, int]:
    k, n = (int(v) for v in text.lower().split("x"))
    return k, n


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", type=parse_shape, nargs="+",
                    default=[(4096, 4096), (4096, 11008), (11008, 4096)], help="K×N, e.g. 4096x11008")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--repeats", type=int, default=None, help="timed calls (default: 100 on GPU, 5 on CPU)")
    ap.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth (default: from the GPU name)")
    ap.add_argument("--merge-entries", type=int, default=None,
                    help="entries per task vector (default: one 11008×4096 matrix on GPU, 4M on CPU)")
    ap.add_argument("--merge-tasks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--qat-width", type=int, default=4096)
    ap.add_argument("--qat-layers", type=int, default=4)
    ap.add_argument("--qat-tokens", type=int, default=8192)
    ap.add_argument("--kernel", choices=["auto", "torch", "triton"], default="auto",
                    help="implementation of the kernels timed: auto = Triton on a GPU, the torch reference on CPU; "
                         "triton on CPU needs TRITON_INTERPRET=1 (a correctness run, not a timing)")
    ap.add_argument("--sections", nargs="+", choices=["matmul", "merge", "qat"], default=["matmul", "merge", "qat"])
    ap.add_argument("--warm-cache", action="store_true",
                    help="CPU matmuls: time back-to-back calls, weights that fit the last-level cache stay there "
                         "(default: that cache is flushed before every call)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every section")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.shapes, args.batches = [(256, 384)], [1, 16]
        args.merge_entries, args.merge_tasks = 1 << 14, [2]
        args.qat_width, args.qat_layers, args.qat_tokens = 128, 2, 64
    args.repeats = args.repeats or (100 if device.type == "cuda" else (2 if args.quick else 5))
    args.impl = kernels.resolve_kernel(args.kernel, device)
    peak = peak_gbps(device, args.peak_gbps)
    rows = ((gemm_rows(args, device, peak) if "matmul" in args.sections else [])
            + (merge_rows(args, device, peak) if "merge" in args.sections else [])
            + (qat_rows(args, device) if "qat" in args.sections else []))
    df = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "kernels.csv", index=False)
    cache = "warm cache" if args.warm_cache else f"{last_level_cache_bytes() >> 20} MiB cache flushed before each call"
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads, matmuls with {cache}")
    title = f"# Kernel benchmark on {name} (peak {peak or 'unknown'} GB/s)\n\n"
    (args.out / "kernels.md").write_text(title + df.to_markdown(index=False) + "\n")
    plot(df, args.out / "kernels.png")
    print(title + df.to_string(index=False))
    return df


if __name__ == "__main__":
    main()
