"""pretrained: start from the weights of a safetensors checkpoint of the same architecture
(transfer learning; the fine-tuning setup of e.g. Yosinski et al., "How Transferable Are
Features in Deep Neural Networks?", NeurIPS 2014).

Loaded with safetensors only (never pickle). Every tensor of the model's state dict must be
present with the same shape and finite, and the file may hold nothing else: the first
missing, extra, mis-shaped or non-finite tensor is named with the file. Values are copied
bit-exactly when the dtypes agree (else cast to the model's dtype).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from slimforge.artifacts import WEIGHTS, ArtifactError, load_tensors
from slimforge.checkpoint import check_state


def resolve(path: str | Path, root: Path | None) -> Path:
    """A config path: absolute as given, relative to the workspace root (or the cwd)."""
    path = Path(path)
    return path if path.is_absolute() or root is None else Path(root) / path


def checkpoint_file(path: Path) -> Path:
    """A .safetensors file, or a directory holding model.safetensors."""
    return path / WEIGHTS if path.is_dir() else path


@torch.no_grad()
def load_weights(model: nn.Module, file: Path, where: str) -> None:
    """Copy every tensor of a safetensors checkpoint into ``model`` after checking it fits."""
    if not file.is_file():
        raise ArtifactError(f"{where}: checkpoint {file} not found")
    try:
        tensors = load_tensors(file)
    except ArtifactError as e:  # truncated or corrupt: name the params key that pointed here
        raise ArtifactError(f"{where}: {e}") from None
    check_state(f"{where}: {file}", model.state_dict(), tensors)
    model.load_state_dict(tensors, strict=True)


def load_pretrained(model: nn.Module, path: str | Path, root: Path | None = None) -> None:
    load_weights(model, checkpoint_file(resolve(path, root)), "train.init.pretrained")
