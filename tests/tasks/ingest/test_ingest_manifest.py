"""manifest.csv: built rows pass the pandera schema; corrupted ones fail it."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pandas as pd
import pytest
from pandera.errors import SchemaError, SchemaErrors

from tasks.ingest.manifest import MANIFEST_SCHEMA, build_manifest


@pytest.fixture
def manifest(arrays) -> pd.DataFrame:
    x, y = arrays
    split = (np.arange(len(y)) % 3).astype(np.uint8)
    return build_manifest(x, y, split)


def test_manifest_rows_describe_the_examples(arrays, manifest):
    x, y = arrays
    assert list(manifest.columns) == ["id", "label", "split", "sha256"]
    assert manifest["id"].tolist() == list(range(len(x)))
    assert manifest["label"].tolist() == y.tolist()
    assert manifest["split"].tolist()[:3] == ["train", "val", "test"]
    assert manifest["sha256"][7] == hashlib.sha256(x[7].astype("<f4").tobytes()).hexdigest()
    assert manifest["sha256"].nunique() == len(x)  # random examples: all distinct


def test_manifest_survives_a_csv_round_trip(manifest):
    buf = io.StringIO()
    manifest.to_csv(buf, index=False)
    MANIFEST_SCHEMA.validate(pd.read_csv(io.StringIO(buf.getvalue())))


@pytest.mark.parametrize("column, row, value", [
    ("id", 1, 0),  # duplicate id
    ("id", 2, -3),
    ("sha256", 4, "not-a-hash"),
    ("sha256", 5, "A" * 64),  # upper-case hex is not what we write
    ("split", 6, "holdout"),
    ("label", 0, -1),
])
def test_corrupted_manifest_fails_the_schema(manifest, column, row, value):
    bad = manifest.copy()
    bad.loc[row, column] = value
    with pytest.raises(SchemaError, match=column):
        MANIFEST_SCHEMA.validate(bad)


def test_extra_column_fails_the_schema(manifest):
    with pytest.raises((SchemaError, SchemaErrors), match="column 'path' not in"):
        MANIFEST_SCHEMA.validate(manifest.assign(path="x.png"))
