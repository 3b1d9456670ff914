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

from slimforge.artifacts import META, WEIGHTS, ArtifactError, load_tensors, read_meta, save_tensors, write_meta
from slimforge.models import Classifier, ModelConfig, build_model

_MODEL_CONFIG = TypeAdapter(ModelConfig)


def model_spec(model_config, input_shape, num_classes: int) -> dict:
    return {"config": model_config.model_dump(mode="json"), "input_shape": list(input_shape),
            "num_classes": int(num_classes)}


def build_from_spec(spec: dict) -> Classifier:
    cfg = _MODEL_CONFIG.validate_python(spec["config"])
    return build_model(cfg, tuple(spec["input_shape"]), spec["num_classes"])


def save_model(directory: Path, tensors: dict[str, Tensor], spec: dict, **meta) -> dict:
    """Write weights + meta.json into ``directory`` (the caller makes it atomic)."""
    save_tensors(Path(directory) / WEIGHTS, tensors)
    extra = {"model": spec, "format": meta.pop("format", "dense"), **meta.pop("extra", {})}
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
            raise ArtifactError(f"{where}: tensor {name!r} contains NaN or Inf")


def load_model(directory: Path) -> Classifier:
    """A dense single-head model artifact as a module in eval mode."""
    directory = Path(directory)
    meta = read_meta(directory)
    if meta.get("format", "dense") != "dense":
        raise ArtifactError(f"{directory / META}: format {meta.get('format')!r} is not a dense model")
    model = build_from_spec(meta["model"])
    tensors = load_tensors(directory / WEIGHTS)
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


def load_any(directory: Path):
    """A dense model, or a packed quantized one executed by the real low-bit kernels."""
    meta = read_meta(directory)
    if meta.get("format") == "packed":
        from tasks.quantize import load_packed_artifact  # the quantize stage owns the packed layout

        return load_packed_artifact(Path(directory), build_from_spec(meta["model"]), meta.get("kernel", "auto"))
    return load_model(directory)
