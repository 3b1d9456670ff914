"""The ingest stage runner: load, validate, subset, split, then write one artifact.

artifacts/ingest/ holds data.safetensors (the slimforge.data contract), manifest.csv and
meta.json. Everything is loaded and checked in memory first and written through
atomic_dir, so a bad dataset leaves the workspace exactly as it was.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import torch

from slimforge.artifacts import atomic_dir, write_meta
from slimforge.data import SPLITS, Dataset, save_dataset
from slimforge.workspace import Workspace
from tasks.ingest.config import IngestConfig
from tasks.ingest.manifest import build_manifest
from tasks.ingest.sources import get_source
from tasks.ingest.validate import split_dataset, subset_indices, validate_arrays

MANIFEST = "manifest.csv"


def run(params, ws: Workspace, fanout=None) -> dict:
    """Ingest ``params.ingest`` into ws.artifact("ingest"); return metrics (examples per
    split, num_classes, input_shape) for the caller to write to metrics/ingest.json."""
    cfg: IngestConfig = params.ingest
    root = Path(ws.root).resolve()
    local = _local_path(cfg, root)
    source = describe_source(cfg, local, root)
    load_cfg = cfg.model_copy(update={"path": str(local)}) if local else cfg
    x, y = get_source(cfg.dataset)(load_cfg)
    num_classes = validate_arrays(x, y, source)
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)  # (N, ...), (N,)
    if cfg.max_examples is not None:
        keep = subset_indices(y, cfg.max_examples, cfg.seed)
        x, y = x[keep], y[keep]
    split = split_dataset(y, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    manifest = build_manifest(x, y, split)
    ds = Dataset(x=torch.from_numpy(np.ascontiguousarray(x)), y=torch.from_numpy(y),
                 split=torch.from_numpy(split), num_classes=num_classes)
    parents = {"source": local} if local and local.is_relative_to(root) else {}
    with atomic_dir(ws.artifact("ingest")) as d:
        save_dataset(d, ds)
        manifest.to_csv(d / MANIFEST, index=False, lineterminator="\n")
        write_meta(d, root=root, stage="ingest", method=cfg.dataset, config=cfg.model_dump(),
                   seed=cfg.seed, parents=parents,
                   extra={"num_classes": num_classes, "input_shape": list(ds.input_shape),
                          "source": source})
    return _metrics(split, num_classes, ds.input_shape)


def _local_path(cfg: IngestConfig, root: Path) -> Path | None:
    """Absolute path of a local file source (relative paths are from the workspace root)."""
    if cfg.dataset != "file" or cfg.path.startswith("s3://"):
        return None
    path = Path(cfg.path).expanduser()
    return (path if path.is_absolute() else root / path).resolve()


def describe_source(cfg: IngestConfig, local: Path | None, root: Path) -> str:
    """What meta.json records as the source: a dataset name, a path, or a bare s3:// URI."""
    if cfg.dataset != "file":
        return cfg.dataset
    if local is not None:
        return local.relative_to(root).as_posix() if local.is_relative_to(root) else str(local)
    parts = urlsplit(cfg.path)  # drop any user:secret@ and ?query (presigned signatures)
    return urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))


def _metrics(split: np.ndarray, num_classes: int, input_shape: tuple[int, ...]) -> dict:
    counts = {f"examples_{name}": int((split == code).sum()) for name, code in SPLITS.items()}
    return {**counts, "examples_total": len(split), "num_classes": num_classes,
            "input_shape": list(input_shape)}
