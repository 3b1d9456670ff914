"""The pandera schema of ``metrics/summary.csv``: one row per (artifact, evaluated_on).

``evaluated_on`` is ``test`` (the held-out split), ``tasks-mean`` (the mean over the
fine-tuning tasks, for merged models) or the name of one task. Sizes are bytes on disk,
``bits`` is bits on disk per logical parameter, latencies are median milliseconds per
forward pass at batch 1 and 256; ``accuracy_low``/``accuracy_high`` bound a bootstrap 95%
interval of the accuracy over the test examples, ``flops`` counts one example's forward pass
and ``peak_memory_bytes`` what one forward at batch 256 allocates beyond the weights. The CSV is validated on the way out and on the way in.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pandas as pd

try:  # pandera >= 0.24 moved the pandas API under pandera.pandas
    import pandera.pandas as pa
except ImportError:  # pragma: no cover - older pandera
    import pandera as pa

STAGES = ("ingest", "select", "train", "finetune", "prune", "quantize", "merge")

_unit = [pa.Check.in_range(0.0, 1.0)]
_positive = [pa.Check.gt(0)]

SUMMARY_SCHEMA = pa.DataFrameSchema(
    {
        "artifact": pa.Column(str, pa.Check.str_length(min_value=1)),
        "stage": pa.Column(str, pa.Check.isin(STAGES)),
        "method": pa.Column(str, pa.Check.str_length(min_value=1)),
        "evaluated_on": pa.Column(str, pa.Check.str_length(min_value=1)),
        "accuracy": pa.Column(float, _unit),
        "loss": pa.Column(float, pa.Check.ge(0.0)),
        "ece": pa.Column(float, _unit),
        "size_bytes": pa.Column(int, _positive),
        "sparsity": pa.Column(float, _unit),
        "bits": pa.Column(float, _positive),
        "params": pa.Column(int, _positive),
        "latency_ms_b1": pa.Column(float, _positive),
        "latency_ms_b256": pa.Column(float, _positive),
        # optional: a table written before these measures existed still reads
        "accuracy_low": pa.Column(float, _unit, required=False),  # bootstrap 95% CI over test examples
        "accuracy_high": pa.Column(float, _unit, required=False),
        "flops": pa.Column(int, pa.Check.ge(0), required=False),  # forward FLOPs per example
        "peak_memory_bytes": pa.Column(int, pa.Check.ge(0), required=False),  # one forward at batch 256
        # on the GPU, when one was present (evaluate.gpu: auto)
        "gpu_latency_ms_b1": pa.Column(float, _positive, required=False),
        "gpu_latency_ms_b256": pa.Column(float, _positive, required=False),
        "gpu_peak_memory_bytes": pa.Column(int, pa.Check.ge(0), required=False),
    },
    unique=["artifact", "evaluated_on"],
    strict=True,
    coerce=True,
    name="metrics/summary.csv",
)
COLUMNS = list(SUMMARY_SCHEMA.columns)
REQUIRED = [name for name, col in SUMMARY_SCHEMA.columns.items() if col.required]


class SummaryError(ValueError):
    """A summary table that does not match SUMMARY_SCHEMA (one-line message naming the file)."""


def _one_line(err: Exception, limit: int = 300) -> str:
    if isinstance(err, pa.errors.SchemaErrors) and err.schema_errors:
        err = err.schema_errors[0]  # the first failure, not pandera's JSON report of all of them
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_summary(df: pd.DataFrame, where: str = "summary") -> pd.DataFrame:
    """Validated, coerced copy of ``df`` with columns in schema order, or a one-line SummaryError."""
    # Column-set problems get a plain message; pandera's strict error prints the whole schema.
    missing = [c for c in REQUIRED if c not in df.columns]
    extra = [str(c) for c in df.columns if c not in COLUMNS]
    if missing or extra:
        raise SummaryError(f"{where}: columns do not match the summary schema: missing {missing}, unexpected {extra}")
    try:
        out = SUMMARY_SCHEMA.validate(df, lazy=False)
    except (pa.errors.SchemaError, pa.errors.SchemaErrors) as e:
        raise SummaryError(f"{where}: does not match the summary schema: {_one_line(e)}") from None
    return out[[c for c in COLUMNS if c in out.columns]].reset_index(drop=True)


def write_summary(df: pd.DataFrame, path: Path) -> Path:
    """Validate, then write the CSV through a temp file and os.replace (no partial file on error)."""
    path = Path(path)
    out = validate_summary(df, where=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        out.to_csv(tmp, index=False, lineterminator="\n")  # repr floats: exact round trip
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_summary(path: Path) -> pd.DataFrame:
    """Read and validate ``metrics/summary.csv``; any problem is one SummaryError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SummaryError(f"{path}: file not found; run the evaluate stage first")
    try:
        df = pd.read_csv(path, dtype={c: str for c in ("artifact", "stage", "method", "evaluated_on")})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise SummaryError(f"{path}: not a readable CSV ({_one_line(e)})") from None
    return validate_summary(df, where=str(path))


COMPARISON_SCHEMA = pa.DataFrameSchema(
    {
        "artifact": pa.Column(str, pa.Check.str_length(min_value=1)),
        "evaluated_on": pa.Column(str, pa.Check.str_length(min_value=1)),
        "baseline": pa.Column(str, pa.Check.str_length(min_value=1)),
        "difference": pa.Column(float, pa.Check.in_range(-1.0, 1.0)),
        "low": pa.Column(float, pa.Check.in_range(-1.0, 1.0)),
        "high": pa.Column(float, pa.Check.in_range(-1.0, 1.0)),
        "p_value": pa.Column(float, pa.Check.in_range(0.0, 1.0)),
        "n": pa.Column(int, _positive),
    },
    checks=[pa.Check(lambda df: df["low"] <= df["high"], error="low <= high")],
    strict=True,
    coerce=True,
    name="reports/comparisons.csv",
)


def validate_comparisons(df: pd.DataFrame, where: str = "comparisons") -> pd.DataFrame:
    """The paired method-versus-baseline table, validated, or a one-line SummaryError."""
    try:
        return COMPARISON_SCHEMA.validate(df, lazy=False).reset_index(drop=True)
    except (pa.errors.SchemaError, pa.errors.SchemaErrors) as e:
        raise SummaryError(f"{where}: does not match the comparison schema: {_one_line(e)}") from None
