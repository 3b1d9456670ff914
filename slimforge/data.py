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


def resolve_inside(root: Path, entry: str, source: str | Path) -> Path:
    """The file that ``entry`` (a path listed in a manifest, or found in an image folder) names
    under ``root``. An absolute entry, a ``..`` segment, or a symlink whose target lies outside
    ``root`` raises a one-line ArtifactError naming ``source`` (the manifest or folder) and the
    entry: a dataset must not read files it does not contain."""
    root = Path(root).resolve()
    if not entry or Path(entry).is_absolute() or ".." in Path(entry).parts or "\0" in entry:
        raise ArtifactError(f"{source}: entry {entry!r} is not a relative path inside {root}; "
                            "expected a path such as 'cat/0001.png' without '..'")
    path = (root / entry).resolve()
    if not path.is_relative_to(root):
        raise ArtifactError(f"{source}: entry {entry!r} resolves to {path}, outside {root} "
                            "(a symlink?); expected files inside the dataset's root")
    return path


def batches(n: int, batch_size: int, generator: torch.Generator | None = None):
    """Index batches over n examples; shuffled when a generator is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]
