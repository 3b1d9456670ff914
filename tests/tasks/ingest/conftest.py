"""Shared fixtures for the ingest tests: tiny seeded arrays, file writers, fake params."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.ingest import IngestConfig


@pytest.fixture
def arrays() -> tuple[np.ndarray, np.ndarray]:
    """x (60, 1, 4, 4) float32 in [0, 1), y (60,) int64 with 20 examples of each of 3 classes."""
    rng = np.random.default_rng(123)
    x = rng.random((60, 1, 4, 4), dtype=np.float32)
    y = np.arange(60, dtype=np.int64) % 3
    return x, y


@pytest.fixture
def write_npz(tmp_path):
    """write_npz(name, **arrays) -> path of an .npz in tmp_path (object arrays allowed)."""
    def write(name: str, **arrays) -> Path:
        path = tmp_path / name
        np.savez(path, **arrays)
        return path
    return write


@pytest.fixture
def write_parquet(tmp_path):
    """write_parquet(name, columns: dict, shape=None) -> path of a .parquet in tmp_path."""
    def write(name: str, columns: dict, shape: list[int] | None = None) -> Path:
        table = pa.table(columns)
        if shape is not None:
            table = table.replace_schema_metadata({"shape": str(list(shape))})
        path = tmp_path / name
        pq.write_table(table, path)
        return path
    return write


@pytest.fixture
def make_params():
    """make_params(**ingest_fields) -> an object with .ingest, as the pipeline passes it."""
    return lambda **fields: SimpleNamespace(ingest=IngestConfig(**fields))
