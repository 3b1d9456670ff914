"""Model artifacts: a directory with model.safetensors and meta.json.

meta.json's ``model`` entry (architecture config, input shape, class count) is enough to
rebuild the module, so later stages read the architecture from the artifact's lineage,
not from params. A multi-head artifact (the merge) stores one backbone and a head per task
as ``heads.<task>.weight`` / ``heads.<task>.bias``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import TypeAdapter
from torch import Tensor

from slimforge import sparse_format
from slimforge.artifacts import (
    META,
    WEIGHTS,
    ArtifactError,
    load_tensors,
    read_meta,
    save_tensors,
    write_meta,
)
from slimforge.models import Classifier, ModelConfig, build_model

_MODEL_CONFIG = TypeAdapter(ModelConfig)


def model_spec(model_config, input_shape, num_classes: int) -> dict:
    return {"config": model_config.model_dump(mode="json"), "input_shape": list(input_shape),
            "num_classes": int(num_classes)}


def spec_config(spec: dict):
    """The architecture config (CNNConfig, MLPConfig, ViTConfig) a model spec names."""
    return _MODEL_CONFIG.validate_python(spec["config"])


def build_from_spec(spec: dict) -> Classifier:
    """The module a spec describes; a ``low_rank`` entry ({layer: rank}, written by the prune
    stage's svd) replaces those layers by their two-factor form before weights are loaded."""
    model = build_model(spec_config(spec), tuple(spec["input_shape"]), spec["num_classes"])
    if spec.get("low_rank"):
        from tasks.prune.lowrank import (
            factorize_with_ranks,  # the prune stage owns the factor layers
        )

        factorize_with_ranks(model, spec["low_rank"])
    return model


def save_model(directory: Path, tensors: dict[str, Tensor], spec: dict, **meta) -> dict:
    """Write weights + meta.json into ``directory`` (the caller makes it atomic). With
    ``format="sparse"`` the tensors are stored as bitmask + values where that is smaller
    (``slimforge.sparse_format``), so the file shrinks with sparsity."""
    fmt = meta.pop("format", "dense")
    extra = {"model": spec, "format": fmt, **meta.pop("extra", {})}
    if fmt == "sparse":
        tensors, extra["sparse_layout"] = sparse_format.encode(tensors)
    save_tensors(Path(directory) / WEIGHTS, tensors)
    return write_meta(directory, extra=extra, **meta)


def check_state(where: str | Path, expected: dict[str, Tensor], got: dict[str, Tensor]) -> None:
    """Refuse a checkpoint that does not fit: the first missing, extra, mis-shaped or
    non-finite tensor is named, with ``where`` (the file) in front."""
    missing = [k for k in expected if k not in got]
    if missing:
        raise ArtifactError(f"{where}: missing tensor {missing[0]!r} ({len(missing)} missing in all); "
                            "is it a checkpoint of this architecture?")
    extra = [k for k in got if k not in expected]
    if extra:
        raise ArtifactError(f"{where}: unexpected tensor {extra[0]!r} ({len(extra)} in all) that this "
                            "architecture does not have")
    for name, ref in expected.items():
        if got[name].shape != ref.shape:
            raise ArtifactError(f"{where}: tensor {name!r} has shape {tuple(got[name].shape)}, "
                                f"the architecture expects {tuple(ref.shape)}")
        if got[name].is_floating_point() and not torch.isfinite(got[name]).all():
            raise ArtifactError(f"{where}: tensor {name!r} contains NaN or Inf; expected finite weights")


def load_model(directory: Path) -> Classifier:
    """A dense (or sparse-stored) single-head model artifact as a module in eval mode."""
    directory = Path(directory)
    meta = read_meta(directory)
    if meta.get("format", "dense") not in ("dense", "sparse"):
        raise ArtifactError(f"{directory / META}: format {meta.get('format')!r} is not a dense or sparse model")
    model = build_from_spec(meta["model"])
    tensors = load_tensors(directory / WEIGHTS)
    if meta.get("format") == "sparse":
        try:
            tensors = sparse_format.decode(tensors, meta.get("sparse_layout", {}), str(directory / WEIGHTS))
        except ValueError as e:
            raise ArtifactError(str(e)) from None
    expected = model.state_dict()
    check_state(directory / WEIGHTS, expected, tensors)
    model.load_state_dict(tensors)
    return model.eval()


def multihead_tensors(backbone: dict[str, Tensor], heads: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    out = {f"backbone.{k}": v for k, v in backbone.items()}
    for task, head in heads.items():
        out.update({f"heads.{task}.{k}": v for k, v in head.items()})
    return out


def load_multihead(directory: Path) -> dict[str, Classifier]:
    """task -> model sharing one merged backbone, each with its own head."""
    directory = Path(directory)
    meta = read_meta(directory)
    tensors = load_tensors(directory / WEIGHTS)
    models = {}
    for task in meta["tasks"]:
        model = build_from_spec(meta["model"])
        state = {k: v for k, v in tensors.items() if k.startswith("backbone.")}
        state.update({f"head.{k.split('.')[-1]}": v for k, v in tensors.items() if k.startswith(f"heads.{task}.")})
        check_state(directory / WEIGHTS, model.state_dict(), state)
        model.load_state_dict(state)
        models[task] = model.eval()
    return models


def pruned_2to4(meta: dict) -> bool:
    """True when meta.json says the prune stage's nm method made every pruned Linear fit 2:4
    (at most 2 nonzeros in every 4 inputs: n:m with m dividing 4 and n·4/m <= 2)."""
    if meta.get("stage") != "prune" or meta.get("method") != "nm":
        return False
    n, m = meta.get("config", {}).get("n"), meta.get("config", {}).get("m")
    return isinstance(n, int) and isinstance(m, int) and m > 0 and 4 % m == 0 and n * (4 // m) <= 2


def load_any(directory: Path, device: torch.device | str = "cpu"):
    """A dense model, or a packed quantized one executed by the real low-bit kernels, on ``device``
    (a packed model is built there: its execution modules depend on the device). On a CUDA device a
    2:4-pruned model (``pruned_2to4``) runs its 2:4 Linear layers on the GPU's sparse tensor cores
    where it has them (``kernels.sparse24``), so it is timed with the kernel it would really run on."""
    meta = read_meta(directory)
    if meta.get("format") == "packed":
        from tasks.quantize import load_packed_artifact  # the quantize stage owns the packed layout

        model = build_from_spec(meta["model"]).to(device)
        return load_packed_artifact(Path(directory), model, meta.get("kernel", "auto"), meta.get("cpu_int4", "w4a16"))
    model = load_model(directory).to(device)
    if torch.device(device).type == "cuda" and pruned_2to4(meta):
        from kernels.sparse24 import sparsify_24

        sparsify_24(model, "auto")  # semi-structured on compute capability >= 8.0, else left dense
    return model
