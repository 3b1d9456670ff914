"""rewind: Frankle, Dziugaite, Roy & Carbin, "Linear Mode Connectivity and the Lottery
Ticket Hypothesis" (ICML 2020).

Start from a parent run's weights at step k (rewinding to early training rather than to
step 0), optionally times a pruning mask, as iterative magnitude pruning does. The parent's
checkpoints are ``<run>/step-<k:08d>/model.safetensors``, each the model's full state dict.
Kept weights equal the checkpoint bit-exactly; masked ones are exactly 0.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from slimforge.artifacts import WEIGHTS, ArtifactError, load_tensors
from tasks.train.inits.pretrained import load_weights, resolve

_STEP = re.compile(r"step-(\d{8,})")


def available_steps(run: Path) -> list[int]:
    """Steps that have a model.safetensors under ``run``, ascending."""
    if not run.is_dir():
        return []
    found = (_STEP.fullmatch(d.name) for d in run.iterdir() if (d / WEIGHTS).is_file())
    return sorted(int(m.group(1)) for m in found if m)


def step_checkpoint(run: Path, step: int) -> Path:
    """``run``/step-<step:08d>/model.safetensors, or an error listing the steps there are."""
    file = run / f"step-{step:08d}" / WEIGHTS
    if not file.is_file():
        steps = available_steps(run)
        there = ", ".join(map(str, steps)) if steps else "none"
        raise ArtifactError(f"train.init.rewind: run {run} has no checkpoint at step {step} "
                            f"(expected {file}); available steps: {there}")
    return file


def read_masks(model: nn.Module, file: Path) -> dict[str, Tensor]:
    """{param name: bool mask} from a 0/1 safetensors file, checked against ``model``."""
    params = dict(model.named_parameters())
    masks = {k: m != 0 for k, m in load_tensors(file).items()}
    for name, mask in masks.items():
        if name not in params:
            raise ArtifactError(f"train.init.rewind: {file}: mask {name!r} names no parameter of this model")
        if mask.shape != params[name].shape:
            raise ArtifactError(f"train.init.rewind: {file}: mask {name!r} has shape {tuple(mask.shape)}, "
                                f"the parameter has {tuple(params[name].shape)}")
    return masks


def rewind(model: nn.Module, run: str | Path, step: int, mask: str | Path | None = None,
           root: Path | None = None) -> dict[str, Tensor]:
    """Load the step checkpoint into ``model``; with a mask file, prune it and return the masks.

    Everything is checked before ``model`` is touched, so a refused rewind changes nothing.
    """
    file = step_checkpoint(resolve(run, root), step)
    masks = read_masks(model, resolve(mask, root)) if mask is not None else {}
    load_weights(model, file, f"train.init.rewind (step {step})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, m in masks.items():
            params[name].masked_fill_(~m, 0.0)  # +0.0 exactly; kept weights bit-exact
    return masks
