"""Merge inputs on disk: safetensors checkpoints read one tensor at a time.

A checkpoint path is one of

- a ``.safetensors`` file, or a directory holding ``model.safetensors`` (a dense slimforge
  artifact included);
- a Hugging Face-style sharded checkpoint: a directory (or the index file itself) with
  ``model.safetensors.index.json`` = ``{"weight_map": {tensor: shard file}}`` beside the shards;
- a slimforge packed quantized artifact (``meta.json`` with ``"format": "packed"``), read as its
  dequantized float state dict (see ``_packed_state``).

Shapes and dtypes come from the safetensors headers, so checking that K models fit a base reads
no weights. ``Checkpoint.get`` opens the file, copies one tensor out and closes it again: no
handle (and no memory-mapped page) outlives the read, which is what lets a merge stream K
checkpoints through the memory of about one tensor each.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Self

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError, safe_open
from torch import Tensor

from slimforge.artifacts import META, WEIGHTS, ArtifactError, LocalPath, read_meta
from slimforge.data import resolve_inside

INDEX = "model.safetensors.index.json"
FORMATS = ("dense", "checkpoint", "packed")  # meta.json formats a merge reads (checkpoint: a streamed merge)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64,
          "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointInputs(BaseModel):
    """What a merge reads: one base and the task models fine-tuned from it."""

    model_config = ConfigDict(extra="forbid")

    base: LocalPath = Field(description="path of the shared base checkpoint θ₀")
    models: list[LocalPath] = Field(min_length=1, description="paths of the fine-tuned checkpoints θ_1..θ_K")
    include: list[str] = Field(
        default=["*"], min_length=1,
        description="fnmatch patterns of the tensor names merged; the others are copied from the base")


class Checkpoint:
    """Names, shapes and dtypes of a checkpoint's tensors, and each tensor on demand."""

    def __init__(self, path: Path, files: dict[str, Path], shapes: dict[str, tuple[int, ...]],
                 dtypes: dict[str, torch.dtype], tensors: dict[str, Tensor] | None = None):
        self.path = path
        self._files, self._shapes, self._dtypes, self._tensors = files, shapes, dtypes, tensors
        self._closed = False

    def names(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[self._known(name)]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[self._known(name)]

    def file(self, name: str) -> Path:
        """The file holding ``name`` (its shard for a sharded checkpoint)."""
        return self._files.get(name, self.path)

    def get(self, name: str, rows: slice | None = None) -> Tensor:
        """One tensor, or its ``rows`` (a slice of the first axis), copied out of its file
        (which is closed again before returning)."""
        self._known(name)
        if self._tensors is not None:
            return self._tensors[name] if rows is None else self._tensors[name][rows]
        try:
            with safe_open(str(self._files[name]), framework="pt") as f:
                tensor = f.get_tensor(name) if rows is None else f.get_slice(name)[rows]
        except (SafetensorError, OSError) as e:
            raise ArtifactError(f"{self._files[name]}: cannot read tensor {name!r} ({_brief(e)})") from None
        _check_finite(tensor, self._files[name], name)
        return tensor

    def close(self) -> None:
        """Drop what is held in memory (a dequantized packed checkpoint); no file stays open."""
        self._tensors = {} if self._tensors is not None else None
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _known(self, name: str) -> str:
        if self._closed:
            raise ArtifactError(f"{self.path}: checkpoint already closed")
        if name not in self._shapes:
            raise ArtifactError(f"{self.path}: no tensor {name!r}")
        return name


def _brief(err: BaseException) -> str:
    """The library's error on one line: a forged header can put line breaks in it."""
    return " ".join(str(err).split())


_FINITE_CHUNK = 1 << 20  # elements checked at once: the check's bool mask stays ~1 MiB for any tensor


def _check_finite(tensor: Tensor, file: Path, name: str) -> None:
    """Refuse NaN/Inf weights (a diverged fine-tune) before they are merged into every output."""
    if not tensor.is_floating_point():
        return
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        if not torch.isfinite(flat[start:start + _FINITE_CHUNK]).all():
            raise ArtifactError(f"{file}: tensor {name!r} has NaN/Inf values; expected finite weights")


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A Checkpoint for a safetensors file, a directory holding one, a sharded HF-style
    checkpoint, or a packed quantized artifact; anything else raises a one-line ArtifactError."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: no such file or directory")
    if path.is_file():
        return _sharded(path) if path.name.endswith(".index.json") else _single(path)
    if (path / META).is_file():
        fmt = read_meta(path).get("format", "dense")
        if fmt not in FORMATS:
            raise ArtifactError(f"{path / META}: format {fmt!r} is not one of {', '.join(FORMATS)}")
        if fmt == "packed":
            return _packed(path)
    if (path / WEIGHTS).is_file():
        return _single(path / WEIGHTS)
    if (path / INDEX).is_file():
        return _sharded(path / INDEX)
    raise ArtifactError(f"{path}: holds neither {WEIGHTS}, {INDEX} nor a packed {META}")


def open_inputs(inputs: CheckpointInputs) -> tuple[Checkpoint, list[Checkpoint]]:
    """Open the base and every model, and check that they fit (``check_compatible``)."""
    base = _labelled("base", inputs.base)
    models = [_labelled(f"models[{k}]", p) for k, p in enumerate(inputs.models)]
    check_compatible(base, models, inputs.include)
    return base, models


def _labelled(label: str, path: str) -> Checkpoint:
    try:
        return open_checkpoint(path)
    except ArtifactError as e:
        raise ArtifactError(f"{label} {e}") from None


def merged_names(base: Checkpoint, include: Iterable[str] = ("*",)) -> list[str]:
    """The base tensors matching any ``include`` pattern; a pattern matching none raises."""
    include = list(include)
    for pattern in include:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in base.names()):
            raise ValueError(f"include: pattern {pattern!r} matches no tensor of base {base.path} "
                             f"(it has {', '.join(base.names()[:4])}{', ...' if len(base.names()) > 4 else ''})")
    return [n for n in base.names() if any(fnmatch.fnmatchcase(n, p) for p in include)]


def check_compatible(base: Checkpoint, models: list[Checkpoint], include: Iterable[str] = ("*",)) -> None:
    """Every model has every merged base tensor with its shape, float where the base's is float;
    the first misfit raises an ArtifactError naming the model, its file and the tensor."""
    names = merged_names(base, include)
    for k, model in enumerate(models):
        for name in names:
            where = f"models[{k}] {model.file(name)}: tensor {name!r}"
            if name not in model:
                raise ArtifactError(f"models[{k}] {model.path}: no tensor {name!r}, which base {base.path} has")
            if model.shape(name) != base.shape(name):
                raise ArtifactError(f"{where} has shape {model.shape(name)}, base has {base.shape(name)}")
            if base.dtype(name).is_floating_point and not model.dtype(name).is_floating_point:
                raise ArtifactError(f"{where} is {model.dtype(name)}, base has {base.dtype(name)}: "
                                    f"a float tensor cannot be merged with a non-float one")


def _headers(files: dict[str, Path]) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype]]:
    """Shapes and dtypes of ``{tensor: file}`` read from the headers, no tensor data."""
    shapes, dtypes = {}, {}
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt") as f:
                stored = set(f.keys())
                for name in names:
                    if name not in stored:
                        raise ArtifactError(f"{file}: no tensor {name!r}, which the weight map places there")
                    part = f.get_slice(name)
                    shapes[name], dtype = tuple(part.get_shape()), part.get_dtype()
                    if dtype not in DTYPES:
                        raise ArtifactError(f"{file}: tensor {name!r} has dtype {dtype}, not one of {', '.join(DTYPES)}")
                    dtypes[name] = DTYPES[dtype]
        except (SafetensorError, OSError) as e:
            raise ArtifactError(f"{file}: not a readable safetensors file ({_brief(e)})") from None
    return {n: shapes[n] for n in files}, {n: dtypes[n] for n in files}


def _single(file: Path) -> Checkpoint:
    try:
        with safe_open(str(file), framework="pt") as f:
            names = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{file}: not a readable safetensors file ({_brief(e)})") from None
    files = dict.fromkeys(names, file)
    return Checkpoint(file, files, *_headers(files))


def _sharded(index: Path) -> Checkpoint:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{index}: not a safetensors index with a 'weight_map' ({e!r})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ArtifactError(f"{index}: weight_map must map tensor names to shard file names")
    # a shard must lie in the index's folder: an index must not make the merge read other files
    files = {name: resolve_inside(index.parent, shard, index) for name, shard in weight_map.items()}
    for name, file in files.items():
        if not file.is_file():
            raise ArtifactError(f"{index}: weight_map places tensor {name!r} in shard {file.name!r}, "
                                f"which does not exist")
    return Checkpoint(index, files, *_headers(files))


def _packed(directory: Path) -> Checkpoint:
    state = _packed_state(directory)
    return Checkpoint(directory, {}, {n: tuple(t.shape) for n, t in state.items()},
                      {n: t.dtype for n, t in state.items()}, state)


def _packed_state(directory: Path) -> dict[str, Tensor]:
    """A packed quantized artifact's float state dict, dequantized whole when opened (our models
    are small): each packed layer's ``<layer>.weight`` (``<layer>.in_proj_weight`` for an
    attention) is its effective weight, every other stored tensor (biases, norms, layers left in
    float, buffers) is kept as stored; the layers' codes, scales and extras are dropped."""
    from slimforge.checkpoint import build_from_spec
    from tasks.quantize import dequantized_state, read_packed  # the quantize stage owns the layout

    meta = read_meta(directory)
    if "model" not in meta:
        raise ArtifactError(f"{directory / META}: no 'model' entry to rebuild the packed model from")
    tensors, metadata = read_packed(directory)
    try:
        return dequantized_state(build_from_spec(meta["model"]), tensors, metadata)
    except ArtifactError as e:
        raise ArtifactError(f"{directory / WEIGHTS}: {e}") from None
