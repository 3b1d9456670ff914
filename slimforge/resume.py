"""Exact-resume checkpoints of the training loop, without pickle.

Every N optimizer steps (and at the end) ``fit`` writes ``<directory>/step-<step:08d>/``:
  model.safetensors      the model's full state dict (what ``train.init: rewind`` reads)
  optimizer.safetensors  the optimizer's state tensors, keyed ``<param index>.<name>``
  optimizer.json         its non-tensor state and param groups
  state.json             position (step, epoch, batch within the epoch), schedule, lr, losses
  rng.safetensors        uint8 generator states: at the start of the current epoch (so its
                         permutation can be drawn again), now, and torch's global CPU RNG
Each is written into a temporary directory renamed into place (``atomic_dir``); only the
newest ``keep_last`` survive. On start ``fit`` loads the newest readable checkpoint, skipping
(with a warning) a partial or corrupt one, so a killed run continues to bit-identical
weights on CPU.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimforge.artifacts import (
    WEIGHTS,
    ArtifactError,
    atomic_dir,
    load_tensors,
    save_tensors,
    write_json_atomic,
)

log = logging.getLogger(__name__)

FILES = (WEIGHTS, "optimizer.safetensors", "optimizer.json", "state.json", "rng.safetensors")
_STEP = re.compile(r"step-(\d{8,})")
_LEFTOVER = re.compile(r"\.step-\d{8,}\.(tmp|old)-[0-9a-f]+")  # atomic_dir's, from a killed run


class CheckpointWarning(UserWarning):
    """A checkpoint that could not be read and was skipped."""


@dataclass(frozen=True)
class Checkpointing:
    directory: Path
    every_steps: int  # optimizer steps between checkpoints (the last step is always saved)
    keep_last: int = 2  # newest step directories kept; 0 keeps all

    def due(self, step: int, total: int) -> bool:
        return self.every_steps > 0 and (step % self.every_steps == 0 or step == total)


@dataclass
class Position:
    """Where the loop is: ``step`` optimizer steps done, ``batch`` of them in ``epoch``."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    running: float = 0.0  # Σ loss·batch size over this epoch's done batches
    history: list[float] = field(default_factory=list)  # mean loss of each finished epoch
    epoch_rng: Tensor | None = None  # uint8 data-generator state at the start of ``epoch``


def step_dirs(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step-<k> directory, oldest first."""
    if not Path(directory).is_dir():
        return []
    found = ((_STEP.fullmatch(d.name), d) for d in Path(directory).iterdir() if d.is_dir())
    return sorted((int(m.group(1)), d) for m, d in found if m)


def save_checkpoint(ckpt: Checkpointing, pos: Position, model: nn.Module, opt: torch.optim.Optimizer,
                    generator: torch.Generator, extra: dict[str, Any]) -> Path:
    """Write step-<pos.step> atomically, then drop all but the newest ``keep_last``."""
    final = Path(ckpt.directory) / f"step-{pos.step:08d}"
    tensors, meta = optimizer_to_files(opt)
    with atomic_dir(final) as d:
        save_tensors(d / WEIGHTS, model.state_dict())
        save_tensors(d / "optimizer.safetensors", tensors)
        write_json_atomic(d / "optimizer.json", meta)
        save_tensors(d / "rng.safetensors", {"epoch_start": pos.epoch_rng, "current": generator.get_state(),
                                             "torch_cpu": torch.get_rng_state()})
        state = {k: v for k, v in asdict(pos).items() if k != "epoch_rng"}
        write_json_atomic(d / "state.json", {**state, **extra})
    if ckpt.keep_last > 0:
        for _, old in step_dirs(ckpt.directory)[: -ckpt.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """The optimizer's state dict as (safetensors tensors, JSON-able rest)."""
    sd = opt.state_dict()
    tensors, plain = {}, {}
    for idx, entries in sd["state"].items():
        for name, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"{idx}.{name}"] = value
            else:
                plain.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "state": plain}


def optimizer_from_files(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict) -> dict:
    """Rebuild a state dict for ``opt`` from ``optimizer_to_files``' output, checking its shape."""
    state: dict[int, dict] = {}
    for idx, entries in meta["state"].items():
        state.setdefault(int(idx), {}).update(entries)
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = meta["param_groups"]
    if len(groups) != len(opt.param_groups):
        raise ArtifactError(f"optimizer.json: {len(groups)} param groups, the optimizer has {len(opt.param_groups)}")
    params = [p for g in opt.param_groups for p in g["params"]]
    ids = [i for g in groups for i in g["params"]]
    for group, current in zip(groups, opt.param_groups):
        for key, value in current.items():  # JSON turned tuples (betas) into lists
            if isinstance(value, tuple) and key in group:
                group[key] = tuple(group[key])
    for idx, entries in state.items():
        if idx not in ids:
            raise ArtifactError(f"optimizer state for parameter {idx}, which no param group lists")
        p = params[ids.index(idx)]
        for name, t in entries.items():
            if isinstance(t, Tensor) and t.dim() > 0 and t.shape != p.shape:
                raise ArtifactError(f"optimizer state {idx}.{name} has shape {tuple(t.shape)}, "
                                    f"the parameter has {tuple(p.shape)}")
    return {"state": state, "param_groups": groups}


@dataclass
class Loaded:
    path: Path
    pos: Position
    state: dict  # state.json
    model: dict[str, Tensor]
    optimizer: dict
    rng: dict[str, Tensor]


def read_checkpoint(path: Path, opt: torch.optim.Optimizer) -> Loaded:
    """Read and check one step directory; raises ArtifactError if any part is unreadable."""
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise ArtifactError(f"{path}: missing {', '.join(missing)}")
    try:
        state = json.loads((path / "state.json").read_text())
        opt_meta = json.loads((path / "optimizer.json").read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    rng = load_tensors(path / "rng.safetensors")
    if {"epoch_start", "current", "torch_cpu"} - rng.keys():
        raise ArtifactError(f"{path / 'rng.safetensors'}: expected epoch_start, current and torch_cpu states")
    try:
        pos = Position(step=state["step"], epoch=state["epoch"], batch=state["batch"], running=state["running"],
                       history=list(state["history"]), epoch_rng=rng["epoch_start"])
        optimizer = optimizer_from_files(opt, load_tensors(path / "optimizer.safetensors"), opt_meta)
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: incomplete checkpoint ({type(e).__name__}: {e})") from None
    return Loaded(path, pos, state, load_tensors(path / WEIGHTS), optimizer, rng)


def load_latest(ckpt: Checkpointing, opt: torch.optim.Optimizer) -> Loaded | None:
    """The newest readable checkpoint in ``ckpt.directory``, or None.

    Unreadable newer ones (a run killed mid-write, a deleted file) are warned about and
    removed, so they are neither resumed from nor kept in place of good ones.
    """
    directory = Path(ckpt.directory)
    if directory.is_dir():
        for leftover in directory.iterdir():
            if _LEFTOVER.fullmatch(leftover.name):
                shutil.rmtree(leftover, ignore_errors=True)
    for _, path in reversed(step_dirs(directory)):
        try:
            return read_checkpoint(path, opt)
        except ArtifactError as e:
            warnings.warn(f"skipping unreadable checkpoint: {e}", CheckpointWarning, stacklevel=3)
            shutil.rmtree(path, ignore_errors=True)
    return None


def restore(loaded: Loaded, model: nn.Module, opt: torch.optim.Optimizer, generator: torch.Generator,
            fingerprint: dict) -> Position:
    """Put model, optimizer and RNGs back to the checkpoint; returns the loop position.

    ``fingerprint`` (data size, fit config) must equal the one the checkpoint was written with:
    a checkpoint of another run is refused, never silently continued.
    """
    if loaded.state.get("fingerprint") != fingerprint:
        raise ArtifactError(f"{loaded.path / 'state.json'}: written by a run with {loaded.state.get('fingerprint')}, "
                            f"this run has {fingerprint}; use another checkpoint directory")
    expected = model.state_dict()
    if loaded.model.keys() != expected.keys() or any(loaded.model[k].shape != v.shape for k, v in expected.items()):
        raise ArtifactError(f"{loaded.path / WEIGHTS}: its tensors do not match this model; "
                            f"checkpoints in {loaded.path.parent} belong to another run")
    model.load_state_dict(loaded.model)
    opt.load_state_dict(loaded.optimizer)
    generator.set_state(loaded.rng["current"])
    torch.set_rng_state(loaded.rng["torch_cpu"])
    log.info("resuming from %s (step %d)", loaded.path, loaded.pos.step)
    return loaded.pos
