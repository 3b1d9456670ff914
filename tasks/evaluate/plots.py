"""The report's figures, one function per plot: summary rows in, a matplotlib Figure out (None when
the rows a plot needs are absent).

Accuracy against size on disk with the Pareto frontier of (higher accuracy, smaller size) per
evaluation group, against sparsity (prune vs train), against bits per parameter (quantize vs
train), and per-task grouped bars for merged models beside the fine-tuned model of each task.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogFormatter, PercentFormatter

PLOT_GROUPS = {"test": ("o", "-"), "tasks-mean": ("s", "--")}  # evaluated_on -> (marker, line)
NOT_A_TASK = ("test", "tasks-mean")
FINE_TUNED = "fine-tuned"  # the column of task_accuracies holding each task's fine-tuned model


def pareto_frontier(df: pd.DataFrame) -> pd.DataFrame:
    """Rows no other row dominates (accuracy ≥ and size_bytes ≤, one of them strictly), by size."""
    acc = df["accuracy"].to_numpy(dtype=float)[:, None]  # (N, 1)
    size = df["size_bytes"].to_numpy(dtype=float)[:, None]
    # dominated[i, j]: row j is at least as good as row i on both axes and better on one.
    dominated = (acc.T >= acc) & (size.T <= size) & ((acc.T > acc) | (size.T < size))  # (N, N)
    keep = ~dominated.any(axis=1)
    return df[keep].sort_values(["size_bytes", "accuracy"], kind="stable")


def to_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No Software/date metadata, so the same summary gives the same bytes.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _axes(title: str, xlabel: str, panels: int = 1) -> tuple[Figure, list]:
    """A figure of ``panels`` side-by-side axes, each titled ``title`` and with accuracy on y."""
    fig = Figure(figsize=(8 if panels == 1 else 6 * panels, 5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(1, panels, squeeze=False)[0])
    for ax in axes:
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.grid(True, which="both", alpha=0.3)
    return fig, axes


def _labelled_points(ax, x: pd.Series, rows: pd.DataFrame, **style) -> None:
    ax.scatter(x, rows["accuracy"], zorder=3, **style)
    points = sorted(zip(x, rows["accuracy"], rows["artifact"]))
    for i, (xi, yi, name) in enumerate(points):  # neighbours along x alternate above and below
        ax.annotate(name, (xi, yi), xytext=(4, 4 if i % 2 == 0 else -11), textcoords="offset points", fontsize=7)


def _finish(fig: Figure, ax) -> Figure:
    ax.margins(x=0.1, y=0.08)  # room for the labels of the outermost points
    if ax.has_data():
        ax.legend(fontsize=8, loc="best")
    return fig


def plot_accuracy_vs_size(summary: pd.DataFrame) -> Figure | None:
    """Accuracy against log size in KB with the Pareto frontier, one panel per group present (test,
    tasks-mean): their accuracies are measured on different data, so each gets its own y axis."""
    groups = [g for g in PLOT_GROUPS if (summary["evaluated_on"] == g).any()]
    if not groups:
        return None
    fig, axes = _axes("", "size on disk (KB, log scale)", len(groups))
    for ax, group in zip(axes, groups):
        marker, line = PLOT_GROUPS[group]
        rows = summary[summary["evaluated_on"] == group]
        ax.set_title(f"Accuracy vs size on disk ({group})")
        _labelled_points(ax, rows["size_bytes"] / 1024, rows, marker=marker, label=f"evaluated on {group}")
        front = pareto_frontier(rows)
        # The step line is the best accuracy reachable at or below each size.
        ax.step(front["size_bytes"] / 1024, front["accuracy"], where="post", linestyle=line,
                color="0.4", label="Pareto frontier", zorder=2)
        ax.set_xscale("log")
        # Plain numbers (800, not 8×10²); minor ticks labelled only when few decades are shown.
        ax.xaxis.set_major_formatter(LogFormatter())
        ax.xaxis.set_minor_formatter(LogFormatter(minor_thresholds=(1, 0.4)))
        _finish(fig, ax)
    return fig


def _on_test(summary: pd.DataFrame, stages: tuple[str, ...]) -> pd.DataFrame:
    return summary[summary["stage"].isin(stages) & (summary["evaluated_on"] == "test")]


def plot_accuracy_vs_sparsity(summary: pd.DataFrame) -> Figure | None:
    """Test accuracy against the fraction of zero weights, pruned models beside the trained ones."""
    rows = _on_test(summary, ("train", "prune"))
    if not (rows["stage"] == "prune").any():
        return None
    fig, (ax,) = _axes("Accuracy vs sparsity (test split)", "sparsity (share of zero weights)")
    for stage, marker in (("train", "o"), ("prune", "^")):
        part = rows[rows["stage"] == stage]
        if not part.empty:
            _labelled_points(ax, part["sparsity"], part, marker=marker, label=stage)
    ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    return _finish(fig, ax)


def plot_accuracy_vs_bits(summary: pd.DataFrame) -> Figure | None:
    """Test accuracy against bits on disk per parameter (log 2 axis), quantized beside trained."""
    rows = _on_test(summary, ("train", "quantize"))
    if not (rows["stage"] == "quantize").any():
        return None
    fig, (ax,) = _axes("Accuracy vs bits per parameter (test split)", "bits per parameter (log scale)")
    for stage, marker in (("train", "o"), ("quantize", "D")):
        part = rows[rows["stage"] == stage]
        if not part.empty:
            _labelled_points(ax, part["bits"], part, marker=marker, label=stage)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    return _finish(fig, ax)


def task_accuracies(summary: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per task (rows: task names, then tasks-mean) of the fine-tuned model of each task
    and of every train or merge artifact (columns, in summary order). Empty without merge rows."""
    merged = summary[summary["stage"].isin(("train", "merge")) & (summary["evaluated_on"] != "test")]
    if not (merged["stage"] == "merge").any():
        return pd.DataFrame()
    tasks = sorted(t for t in merged["evaluated_on"].unique() if t not in NOT_A_TASK)
    index = tasks + (["tasks-mean"] if (merged["evaluated_on"] == "tasks-mean").any() else [])
    table = merged.pivot(index="evaluated_on", columns="artifact", values="accuracy")
    table = table.reindex(index=index, columns=list(dict.fromkeys(merged["artifact"])))
    tuned = summary[summary["artifact"] == "finetune/" + summary["evaluated_on"]]  # on its own task
    reference = tuned.set_index("evaluated_on")["accuracy"].reindex(index)
    if "tasks-mean" in index and tasks and reference[tasks].notna().all():
        reference["tasks-mean"] = reference[tasks].mean()  # comparable: the same tasks, averaged
    table.insert(0, FINE_TUNED, reference)
    return table.dropna(axis=1, how="all").rename_axis(index="task", columns=None)


def plot_task_bars(summary: pd.DataFrame) -> Figure | None:
    """Grouped bars: per task, the fine-tuned model and each train/merge artifact."""
    table = task_accuracies(summary)
    if table.empty:
        return None
    fig, (ax,) = _axes("Accuracy per task: merged vs fine-tuned", "task")
    width = 0.8 / len(table.columns)
    for i, column in enumerate(table.columns):
        values = table[column]
        x = [j + (i - (len(table.columns) - 1) / 2) * width for j, v in enumerate(values) if pd.notna(v)]
        bars = ax.bar(x, values.dropna(), width, label=column, hatch="//" if column == FINE_TUNED else None,
                      edgecolor="white", zorder=3)
        ax.bar_label(bars, fmt="%.3f", fontsize=6, padding=1)
    ax.set_xticks(range(len(table)), table.index)
    ax.set_ylim(0, 1.08)
    ax.grid(False, axis="x")
    ax.legend(fontsize=8, loc="upper left", ncols=min(4, len(table.columns)))
    return fig


# File name -> (alt text, plot function), in the order the report shows them.
PLOTS: dict[str, tuple[str, Callable[[pd.DataFrame], Figure | None]]] = {
    "accuracy_vs_size.png": ("accuracy vs size", plot_accuracy_vs_size),
    "accuracy_vs_sparsity.png": ("accuracy vs sparsity", plot_accuracy_vs_sparsity),
    "accuracy_vs_bits.png": ("accuracy vs bits per parameter", plot_accuracy_vs_bits),
    "accuracy_per_task.png": ("accuracy per task, merged vs fine-tuned", plot_task_bars),
}
