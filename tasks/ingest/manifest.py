"""manifest.csv: one row per ingested example, checked by a pandera schema.

Columns: id (row index into data.safetensors), label, split name, and sha256 of the
example's float32 little-endian bytes, so a changed pixel shows up as a changed row.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

try:  # pandera >= 0.24 moved the pandas API to pandera.pandas
    import pandera.pandas as pa
except ImportError:  # pragma: no cover - older pandera
    import pandera as pa

from slimforge.data import SPLITS

SPLIT_NAMES = {code: name for name, code in SPLITS.items()}  # 0 -> "train", ...

MANIFEST_SCHEMA = pa.DataFrameSchema(
    {
        "id": pa.Column(int, pa.Check.ge(0), unique=True),
        "label": pa.Column(int, pa.Check.ge(0)),
        "split": pa.Column(str, pa.Check.isin(list(SPLITS))),
        "sha256": pa.Column(str, pa.Check.str_matches(r"^[0-9a-f]{64}$")),
    },
    strict=True,
    ordered=True,
    name="ingest manifest",
)


def example_hashes(x: np.ndarray) -> list[str]:
    """sha256 hex of each example's float32 bytes; x (N, ...)."""
    rows = np.ascontiguousarray(x, dtype="<f4").reshape(len(x), -1)
    return [hashlib.sha256(row.tobytes()).hexdigest() for row in rows]


def build_manifest(x: np.ndarray, y: np.ndarray, split: np.ndarray) -> pd.DataFrame:
    """Validated manifest for x (N, ...), y (N,) labels and split (N,) codes 0/1/2."""
    df = pd.DataFrame({
        "id": np.arange(len(x), dtype=np.int64),
        "label": np.asarray(y, dtype=np.int64),
        "split": [SPLIT_NAMES[int(s)] for s in split],
        "sha256": example_hashes(x),
    })
    return MANIFEST_SCHEMA.validate(df)
