"""The dataset contract between ingest and every later stage.

An ingest artifact directory holds ``data.safetensors`` with
  x:     float32 (N, *input_shape)   inputs, (N, C, H, W) images or (N, L) sequences
  y:     int64   (N,)                labels in [0, num_classes)
  split: uint8   (N,)                0 = train, 1 = val, 2 = test
plus ``manifest.csv`` (one row per example) and ``meta.json`` (num_classes, input_shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from slimforge.artifacts import ArtifactError, load_tensors, read_meta, save_tensors

DATA = "data.safetensors"
SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class Dataset:
    x: Tensor
    y: Tensor
    split: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def part(self, name: str) -> tuple[Tensor, Tensor]:
        """(x, y) of one split: 'train', 'val' or 'test'."""
        mask = self.split == SPLITS[name]
        return self.x[mask], self.y[mask]


def save_dataset(directory: Path, ds: Dataset) -> None:
    save_tensors(Path(directory) / DATA, {"x": ds.x, "y": ds.y, "split": ds.split})


def load_dataset(directory: Path) -> Dataset:
    directory = Path(directory)
    meta = read_meta(directory)
    t = load_tensors(directory / DATA)
    missing = {"x", "y", "split"} - t.keys()
    if missing:
        raise ArtifactError(f"{directory / DATA}: missing tensors {sorted(missing)}")
    return Dataset(x=t["x"], y=t["y"], split=t["split"], num_classes=int(meta["num_classes"]))


def batches(n: int, batch_size: int, generator: torch.Generator | None = None):
    """Index batches over n examples; shuffled when a generator is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]
