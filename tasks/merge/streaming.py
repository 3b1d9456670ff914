"""Task-vector merge of K checkpoints on disk, streamed tensor by tensor.

For each base tensor θ₀ the K fine-tuned tensors θ_k are read, turned into deltas, merged by
``task_arithmetic.merge_tensor`` (the same code as the in-memory merge, so the results are
bit-identical) and written out at once: the peak is about one tensor per input, not K models.
Task arithmetic, model-scope TIES and DARE are elementwise once the thresholds are known (DARE's
mask is counter based: a block passes its flat offset and draws the whole tensor's bits), so they
go further and read each tensor in blocks of whole rows (``block`` entries per input): their
working set does not grow with the largest tensor. Tensor-scope TIES (a threshold per tensor)
reads whole tensors, so its peak follows the largest tensor. With ``trim_scope: model`` TIES first needs each task's keep threshold over its whole
task vector; those are found one task at a time in one flat float32 buffer of |τ_k| (about one
model), before any output exists.

The output is a safetensors file written by hand: its header (names, dtypes, shapes, offsets)
follows from the base's header, so each merged block's bytes go to disk as soon as they exist
(``safetensors.torch.save_file`` would first copy every tensor into one Python bytes object).
It is written to a temp file beside the target and renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch
from torch import Tensor

from tasks.merge.checkpoints import DTYPES, Checkpoint, check_compatible, merged_names
from tasks.merge.task_arithmetic import (
    TaskVectorConfig,
    merge_task_vectors,
    merge_tensor,
    task_vectors,
)
from tasks.merge.ties import keep_threshold

DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
BLOCK = 1 << 18  # entries per input read at a time by task arithmetic and the TIES thresholds


def blockwise(cfg: TaskVectorConfig) -> bool:
    """Whether merge_tensor gives the same bits on a block of rows as on the whole tensor."""
    return not (cfg.method == "ties" and cfg.trim_scope == "tensor")


class Entry(NamedTuple):
    """One output tensor: its dtype, shape and byte range in the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def stream_merge(base: Checkpoint, models: list[Checkpoint], out_path: Path, lam: float,
                 cfg: TaskVectorConfig, include=("*",), rescale: float | None = None,
                 metadata: dict[str, str] | None = None, block: int = BLOCK) -> dict:
    """Write θ₀ + λ·combine(sparsify(τ_k)) over the tensors ``include`` matches (the rest copied
    from the base) to the safetensors file ``out_path``; return {tensors, merged, bytes, seconds}.

    Task arithmetic, model-scope TIES and DARE read and merge ``block`` entries (whole rows) at a
    time, tensor-scope TIES whole tensors. Bad inputs raise before anything is written; a failure later leaves no file
    behind (an older ``out_path`` stays as it was)."""
    start = time.perf_counter()
    merged = set(merged_names(base, include))
    check_compatible(base, models, include)
    layout = output_layout(base, models, merged)
    header = header_bytes(layout, metadata)
    thresholds = task_thresholds(base, models, [n for n in base.names() if n in merged], cfg, block)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for entry in layout:
                for part in _merged_parts(entry.name, base, models, entry.name in merged, lam, cfg,
                                          thresholds, rescale, block):
                    _write(f, part, entry)
                    del part  # not held while the next block is merged
                if f.tell() != len(header) + entry.end:
                    raise RuntimeError(f"merge: tensor {entry.name!r} wrote {f.tell() - len(header) - entry.begin} "
                                       f"bytes, the header promised {entry.end - entry.begin}")
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"tensors": len(layout), "merged": len(merged), "bytes": out_path.stat().st_size,
            "seconds": round(time.perf_counter() - start, 3)}


def _merged_parts(name: str, base: Checkpoint, models: list[Checkpoint], merge: bool, lam: float,
                  cfg: TaskVectorConfig, thresholds: list[float] | None, rescale: float | None,
                  block: int) -> Iterator[Tensor]:
    """The output tensor ``name`` as consecutive row blocks (or whole)."""
    if not merge or not base.dtype(name).is_floating_point:
        yield base.get(name)  # copied; merge_tensor keeps θ₀'s non-float tensors (buffers) too
        return
    row_size = int(torch.Size(base.shape(name)[1:]).numel())
    for rows in row_blocks(base.shape(name), block if blockwise(cfg) else None):
        w0 = base.get(name, rows)
        offset = rows.start * row_size if rows is not None else 0  # flat index of the block's first entry
        # each θ_k is dropped as soon as its delta exists
        yield merge_tensor(name, w0, [m.get(name, rows) - w0 for m in models], lam, cfg, thresholds, rescale,
                           offset)


def row_blocks(shape: tuple[int, ...], block: int | None) -> list[slice | None]:
    """Slices of the first axis covering ``shape`` with about ``block`` entries each (at least
    one row); [None] (the whole tensor) for a scalar or when ``block`` is None."""
    if block is None or not shape or shape[0] == 0:
        return [None]
    rows = max(1, block // max(1, int(torch.Size(shape[1:]).numel())))
    return [slice(i, min(i + rows, shape[0])) for i in range(0, shape[0], rows)]


def output_layout(base: Checkpoint, models: list[Checkpoint], merged: set[str]) -> list[Entry]:
    """The output's tensors in file order, widest dtype first so every tensor stays aligned.

    A merged float tensor has the dtype ``θ₀ + λ·Σ(θ_k − θ₀)`` computes in (torch's promotion
    over the base's and the models' dtypes); every other tensor keeps the base's."""
    entries, offset = [], 0
    names = sorted(base.names(), key=lambda n: -base.dtype(n).itemsize)  # stable: base order within a width
    for name in names:
        dtype = base.dtype(name)
        if name in merged and dtype.is_floating_point:
            for model in models:
                dtype = torch.promote_types(dtype, model.dtype(name))
        shape = base.shape(name)
        size = dtype.itemsize * int(torch.Size(shape).numel())
        entries.append(Entry(name, dtype, shape, offset, offset + size))
        offset += size
    return entries


def header_bytes(layout: list[Entry], metadata: dict[str, str] | None) -> bytes:
    """The 8-byte little-endian header length and the JSON header, space-padded to 8 bytes."""
    header: dict = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"merge metadata: safetensors metadata maps strings to strings; "
                             f"{bad[0]!r} holds {type(metadata[bad[0]]).__name__}")
        header["__metadata__"] = dict(sorted(metadata.items()))
    for e in layout:
        header[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _write(f: BinaryIO, tensor: Tensor, entry: Entry) -> None:
    """Append ``tensor`` (the whole of ``entry`` or a block of its rows) to the data section."""
    if tensor.dtype != entry.dtype or tuple(tensor.shape[1:]) != entry.shape[1:]:
        raise RuntimeError(f"merge: tensor {entry.name!r} came out {tensor.dtype} {tuple(tensor.shape)}, "
                           f"the header promised {entry.dtype} {entry.shape}")
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # little-endian bytes, no copy
    f.write(data.numpy().data)


def task_thresholds(base: Checkpoint, models: list[Checkpoint], names: list[str],
                    cfg: TaskVectorConfig, block: int = BLOCK) -> list[float] | None:
    """``trim_thresholds`` read from disk: per task, the keep threshold over |τ_k| of the float
    tensors ``names``, one task at a time in one reused buffer; None unless TIES trims per model."""
    if cfg.method != "ties" or cfg.trim_scope != "model":
        return None
    names = [n for n in names if base.dtype(n).is_floating_point]
    total = sum(int(torch.Size(base.shape(n)).numel()) for n in names)
    magnitudes = torch.empty(total, dtype=torch.float32)  # (Σ numel,), |τ_k| flattened, reused per task
    out = []
    for model in models:
        offset = 0
        for name in names:
            for rows in row_blocks(base.shape(name), block):
                delta = model.get(name, rows) - base.get(name, rows)  # as task_vectors computes it
                magnitudes[offset : offset + delta.numel()] = delta.abs().flatten()
                offset += delta.numel()
        out.append(keep_threshold(magnitudes, cfg.density))
    return out


def load_state(checkpoint: Checkpoint) -> dict[str, Tensor]:
    """Every tensor of a checkpoint in memory."""
    return {name: checkpoint.get(name) for name in checkpoint.names()}


def merge_in_memory(base: Checkpoint, models: list[Checkpoint], lam: float, cfg: TaskVectorConfig,
                    include=("*",), rescale: float | None = None) -> dict[str, Tensor]:
    """The naive merge: load all K + 1 state dicts, form every task vector, merge
    (``task_vectors`` + ``merge_task_vectors``); the reference for ``stream_merge``."""
    merged = merged_names(base, include)
    check_compatible(base, models, include)
    theta0 = load_state(base)
    thetas = [load_state(m) for m in models]
    part = {n: theta0[n] for n in merged}
    out = merge_task_vectors(part, task_vectors(part, thetas), lam, cfg, rescale)
    return {n: out.get(n, w) for n, w in theta0.items()}
