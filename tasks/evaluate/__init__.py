"""evaluate: one harness for every artifact (metrics, size, sparsity, latency) and its report."""

from tasks.evaluate.harness import (
    bits_per_parameter,
    classification_metrics,
    count_parameters,
    expected_calibration_error,
    latency_ms,
    predict,
    prunable_weights,
    size_on_disk,
    sparsity,
)
from tasks.evaluate.report import pareto_frontier, render_report, sort_by_stage
from tasks.evaluate.schema import (
    STAGES,
    SUMMARY_SCHEMA,
    SummaryError,
    read_summary,
    validate_summary,
    write_summary,
)

__all__ = [
    "STAGES",
    "SUMMARY_SCHEMA",
    "SummaryError",
    "bits_per_parameter",
    "classification_metrics",
    "count_parameters",
    "expected_calibration_error",
    "latency_ms",
    "pareto_frontier",
    "predict",
    "prunable_weights",
    "read_summary",
    "render_report",
    "size_on_disk",
    "sort_by_stage",
    "sparsity",
    "validate_summary",
    "write_summary",
]
