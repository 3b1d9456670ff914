"""Merge memory benchmark: peak RSS and wall time of the streamed merge vs the naive one.

A base and ``--models`` fine-tuned checkpoints (random float32 tensors of mixed shapes:
matrices whose sizes cycle 1:2:3:4, a bias vector, a conv kernel and an int64 buffer; about
``--size-mb`` MB each, fine-tunes = base + 0.01·noise) are written to a temp directory. Then,
each in a fresh subprocess so that every peak is its own, for task arithmetic and TIES
(model-scope trim, density 0.2):

- ``stream``: ``tasks.merge.streaming.stream_merge`` (tensor by tensor, written as it goes);
- ``naive``: ``merge_in_memory`` (all K + 1 state dicts and K task vectors in memory, then
  ``merge_task_vectors``) and ``safetensors.torch.save_file`` of the result;
- ``idle``: a child that imports the same modules (python + torch) and does nothing: the
  fixed overhead subtracted from every peak.

Each child prints its peak RSS after the merge and after writing: ``VmHWM`` from
/proc/self/status (KiB), the high-water mark of the child's own address space. Not
``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries the parent's RSS at fork over the exec into
the child's ru_maxrss, so every child would report at least the parent's ~1 GiB (it made the
checkpoints); ru_maxrss is used only where /proc is missing. Pages of the memory-mapped input
files count in RSS while mapped; ``Checkpoint.get`` closes its safe_open handle after copying
each tensor (or block) out, so none stay mapped. The table gives peak − idle in MiB and as a
multiple of one checkpoint's size (target for the streamed merge: ≤ 1.5), wall time, and
whether the two outputs hold bit-identical tensors. Rows go to ``<out>/merge_memory.csv``, the
table to ``merge_memory.md``.

Children run ``--threads`` torch threads (default 1): on a shared 2-core machine OpenMP's
spinning workers made the streamed merge's many small ops over 10× slower with 2 threads
(task arithmetic: 20.7 s vs 1.5 s), which timed the machine's load, not the merge.

    python -m benchmarks.merge_memory [--models 8] [--size-mb 150] [--tensors 24] [--threads 1]
        [--methods task_arithmetic ties] [--workdir /tmp] [--out benchmarks/results] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open

from slimforge.artifacts import save_tensors

OUT = Path(__file__).parent / "results"
METHODS = {"task_arithmetic": {"method": "task_arithmetic"}, "ties": {"method": "ties", "density": 0.2}}
LAMBDA = 0.3
TARGET = 1.5  # issue 7: streamed peak ≤ 1.5 × one checkpoint + the fixed overhead


def tensor_shapes(size_bytes: int, count: int) -> dict[str, tuple[int, ...]]:
    """``count`` float32 tensors of mixed shapes totalling about ``size_bytes``."""
    shapes: dict[str, tuple[int, ...]] = {"layers.0.bias": (1024,), "conv.weight": (64, 32, 3, 3)}
    fixed = 4 * (1024 + 64 * 32 * 9)
    matrices = max(1, count - 3)  # the bias, the conv kernel and the int64 buffer besides
    parts = [1 + i % 4 for i in range(matrices)]
    for i, part in enumerate(parts):
        cols = (512, 768, 1024, 1536)[i % 4]
        numel = (size_bytes - fixed) // 4 * part // sum(parts)
        shapes[f"layers.{i}.weight"] = (max(1, numel // cols), cols)
    return shapes


def write_checkpoints(directory: Path, k: int, size_bytes: int, count: int, seed: int = 0) -> list[Path]:
    """base.safetensors and model{i}.safetensors in ``directory``; returns [base, *models]."""
    g = torch.Generator().manual_seed(seed)
    shapes = tensor_shapes(size_bytes, count)
    base = {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}
    base["norm.num_batches_tracked"] = torch.tensor(100, dtype=torch.int64)
    paths = [directory / "base.safetensors"]
    save_tensors(paths[0], base)
    for i in range(k):
        paths.append(directory / f"model{i}.safetensors")
        save_tensors(paths[-1], {n: t + 0.01 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t
                                 for n, t in base.items()})
    return paths


def peak_kib() -> int:
    """Peak RSS of this process's address space in KiB (VmHWM), else ru_maxrss."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(mode: str, method: str, paths: list[str], target: str, threads: int) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    torch.set_num_threads(threads)
    from safetensors.torch import save_file

    from tasks.merge.checkpoints import open_checkpoint
    from tasks.merge.streaming import merge_in_memory, stream_merge
    from tasks.merge.task_arithmetic import TaskVectorConfig

    start = time.perf_counter()
    out: dict = {"ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}  # at start: inherited
    if mode != "idle":
        base, *models = [open_checkpoint(p) for p in paths]
        cfg = TaskVectorConfig(**METHODS[method])
        if mode == "stream":
            stream_merge(base, models, Path(target), LAMBDA, cfg)
        else:
            merged = merge_in_memory(base, models, LAMBDA, cfg)
            out["merge_kib"] = peak_kib()
            save_file(merged, target)
    out |= {"peak_kib": peak_kib(),
            "seconds": time.perf_counter() - start}
    print(json.dumps(out))


def measure(mode: str, method: str, paths: list[Path], target: Path, threads: int) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.merge_memory", "--child", mode, "--method", method,
                           "--target", str(target), "--threads", str(threads), *map(str, paths)],
                          capture_output=True, text=True, check=False, cwd=Path(__file__).parents[1])
    if done.returncode:
        raise RuntimeError(f"{mode} {method} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def identical(a: Path, b: Path) -> bool:
    """Whether two safetensors files hold the same tensors bit for bit (read one at a time)."""
    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        names = fa.keys()
        return set(names) == set(fb.keys()) and all(torch.equal(fa.get_tensor(n), fb.get_tensor(n)) for n in names)


def run(args) -> pd.DataFrame:
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="merge_memory_") as d:
        d = Path(d)
        paths = write_checkpoints(d, args.models, int(args.size_mb * 1e6), args.tensors)
        size_mib = paths[0].stat().st_size / 2**20
        largest = max(4 * torch.Size(s).numel() for s in tensor_shapes(int(args.size_mb * 1e6), args.tensors).values())
        idle = measure("idle", "task_arithmetic", paths, d / "unused", args.threads)["peak_kib"] / 1024
        print(f"{args.models} models + base of {size_mib:.1f} MiB ({args.tensors} tensors, largest "
              f"{largest / 2**20:.1f} MiB); idle child (python + torch) peak {idle:.0f} MiB", flush=True)
        for method in args.methods:
            for mode in ("stream", "naive"):
                r = measure(mode, method, paths, d / f"{mode}_{method}.safetensors", args.threads)
                peak = r["peak_kib"] / 1024
                merge_only = (r["merge_kib"] / 1024 - idle) / size_mib if "merge_kib" in r else None
                rows.append({"method": method, "mode": mode, "models": args.models, "threads": args.threads,
                             "checkpoint_mib": round(size_mib, 1), "largest_tensor_mib": round(largest / 2**20, 2),
                             "idle_mib": round(idle), "peak_mib": round(peak), "over_idle_mib": round(peak - idle),
                             "x_checkpoint": round((peak - idle) / size_mib, 2),
                             "merge_only_x": None if merge_only is None else round(merge_only, 2),
                             "seconds": round(r["seconds"], 2)})
                print(rows[-1], flush=True)
            rows[-2]["identical"] = rows[-1]["identical"] = identical(d / f"stream_{method}.safetensors",
                                                                      d / f"naive_{method}.safetensors")
    df = pd.DataFrame(rows)
    df["meets_target"] = [x <= TARGET if m == "stream" else None for x, m in zip(df.x_checkpoint, df["mode"], strict=True)]
    return df


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=8, help="number of fine-tuned checkpoints K")
    p.add_argument("--size-mb", type=float, default=150, help="size of each checkpoint in MB (1e6 bytes)")
    p.add_argument("--tensors", type=int, default=24, help="tensors per checkpoint")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--workdir", type=Path, default=None, help="where the checkpoints go (default: the temp dir)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads in every child")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 models of 2 MB, 8 tensors")
    p.add_argument("--child", choices=("idle", "stream", "naive"), help=argparse.SUPPRESS)
    p.add_argument("--method", default="task_arithmetic", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.method, args.paths, args.target, args.threads)
    if args.quick:
        args.models, args.size_mb, args.tensors = 3, 2, 8
    args.out.mkdir(parents=True, exist_ok=True)
    df = run(args)
    df.to_csv(args.out / "merge_memory.csv", index=False)
    table = df.to_markdown(index=False)
    (args.out / "merge_memory.md").write_text(
        f"peak RSS − idle child, as a multiple of one checkpoint (target for stream: ≤ {TARGET})\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
