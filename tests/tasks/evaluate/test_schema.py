"""The summary.csv schema: what it accepts, what it rejects, and an exact round trip."""

from __future__ import annotations

import pandas as pd
import pytest

from tasks.evaluate.schema import (
    SUMMARY_SCHEMA,
    SummaryError,
    read_summary,
    validate_summary,
    write_summary,
)

ROW = {"artifact": "train/base", "stage": "train", "method": "adamw", "evaluated_on": "test", "accuracy": 0.9512345678901234,
       "loss": 0.17, "ece": 0.021, "size_bytes": 1_070_000, "sparsity": 0.0, "bits": 32.1, "params": 266_610,
       "latency_ms_b1": 0.12, "latency_ms_b256": 3.4}


def _summary() -> pd.DataFrame:
    return pd.DataFrame([
        ROW,
        {**ROW, "artifact": "prune/magnitude", "stage": "prune", "method": "magnitude", "sparsity": 0.8},
        {**ROW, "artifact": "merge/ties", "stage": "merge", "method": "ties", "evaluated_on": "tasks-mean"},
        {**ROW, "artifact": "merge/ties", "stage": "merge", "method": "ties", "evaluated_on": "even-odd"},
    ])


def test_valid_summary_passes_and_coerces():
    df = _summary().assign(size_bytes=lambda d: d["size_bytes"].astype(float))  # 1.07e6 -> int
    out = validate_summary(df)
    assert out["size_bytes"].dtype.kind == "i"
    assert len(SUMMARY_SCHEMA.validate(_summary())) == 4


@pytest.mark.parametrize("column, value", [("accuracy", 1.2), ("ece", -0.1), ("sparsity", 1.5), ("loss", -1.0),
                                           ("size_bytes", 0), ("latency_ms_b1", 0.0), ("stage", "distill")])
def test_out_of_range_values_are_rejected(column, value):
    df = _summary()
    df.loc[1, column] = value
    with pytest.raises(SummaryError, match=column):
        validate_summary(df)


def test_missing_and_extra_columns_are_rejected():
    with pytest.raises(SummaryError, match="missing \\['ece'\\]"):
        validate_summary(_summary().drop(columns="ece"))
    with pytest.raises(SummaryError, match="unexpected \\['note'\\]"):
        validate_summary(_summary().assign(note="x"))


def test_duplicate_artifact_and_evaluated_on_is_rejected():
    df = pd.concat([_summary(), _summary().iloc[[0]]], ignore_index=True)
    with pytest.raises(SummaryError, match="not unique"):
        validate_summary(df)


def test_write_read_round_trip(tmp_path):
    path = tmp_path / "metrics" / "summary.csv"
    write_summary(_summary(), path)
    back = read_summary(path)
    pd.testing.assert_frame_equal(back, validate_summary(_summary()))
    assert [p.name for p in path.parent.iterdir()] == ["summary.csv"]  # no temp file left behind


def test_invalid_summary_writes_nothing(tmp_path):
    df = _summary()
    df.loc[0, "accuracy"] = 1.2
    path = tmp_path / "summary.csv"
    with pytest.raises(SummaryError, match="summary.csv"):
        write_summary(df, path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", ["", "artifact,stage\nx,train\n", "\x00\x01garbage"])
def test_read_bad_file_gives_one_line_error_naming_it(tmp_path, text):
    path = tmp_path / "summary.csv"
    path.write_text(text)
    with pytest.raises(SummaryError) as info:
        read_summary(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_read_missing_file(tmp_path):
    with pytest.raises(SummaryError, match="not found"):
        read_summary(tmp_path / "nope.csv")
