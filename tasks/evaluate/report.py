"""Render the summary table as an accuracy-vs-size plot, a Markdown report and a static HTML page.

The plot shows every artifact evaluated on ``test`` and on ``tasks-mean`` (per-task rows stay
in the tables only) and, per group, the Pareto frontier of (higher accuracy, smaller size on
disk): the step line of the best accuracy reachable at or below each size. The two groups are
compared separately because their accuracies are measured on different data.
"""

from __future__ import annotations

import base64
import html
import io
import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tasks.evaluate.schema import STAGES, validate_summary

PLOT_GROUPS = {"test": ("o", "-"), "tasks-mean": ("s", "--")}  # evaluated_on -> (marker, line)
PNG, MARKDOWN, HTML = "accuracy_vs_size.png", "report.md", "report.html"


def pareto_frontier(df: pd.DataFrame) -> pd.DataFrame:
    """Rows no other row dominates (accuracy ≥ and size_bytes ≤, one of them strictly), by size."""
    acc = df["accuracy"].to_numpy(dtype=float)[:, None]  # (N, 1)
    size = df["size_bytes"].to_numpy(dtype=float)[:, None]
    # dominated[i, j]: row j is at least as good as row i on both axes and better on one.
    dominated = (acc.T >= acc) & (size.T <= size) & ((acc.T > acc) | (size.T < size))  # (N, N)
    keep = ~dominated.any(axis=1)
    return df[keep].sort_values(["size_bytes", "accuracy"], kind="stable")


def sort_by_stage(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in pipeline order (ingest ... merge), then by artifact and evaluated_on."""
    order = df["stage"].map({s: i for i, s in enumerate(STAGES)})
    return (df.assign(_order=order).sort_values(["_order", "artifact", "evaluated_on"], kind="stable")
            .drop(columns="_order").reset_index(drop=True))


def _plot(summary: pd.DataFrame, title: str) -> bytes:
    """PNG bytes of accuracy against log size in KB; one marker per row, frontier per group."""
    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for group, (marker, line) in PLOT_GROUPS.items():
        rows = summary[summary["evaluated_on"] == group]
        if rows.empty:
            continue
        kb = rows["size_bytes"] / 1024
        ax.scatter(kb, rows["accuracy"], marker=marker, label=f"evaluated on {group}", zorder=3)
        for x, y, name in zip(kb, rows["accuracy"], rows["artifact"]):
            ax.annotate(name, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
        front = pareto_frontier(rows)
        ax.step(front["size_bytes"] / 1024, front["accuracy"], where="post", linestyle=line,
                color="0.4", label=f"Pareto frontier ({group})", zorder=2)
    ax.set_xscale("log")
    ax.margins(x=0.1, y=0.08)  # room for the labels of the outermost points
    ax.set_xlabel("size on disk (KB, log scale)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize=8, loc="best")
    buf = io.BytesIO()
    # No Software/date metadata, so the same summary gives the same bytes.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _cell(value: object) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _markdown_table(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _frontiers(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    return [(g, pareto_frontier(summary[summary["evaluated_on"] == g])) for g in PLOT_GROUPS
            if (summary["evaluated_on"] == g).any()]


def _markdown(summary: pd.DataFrame, title: str) -> str:
    parts = [f"# {title}", "", f"![accuracy vs size]({PNG})", "", "## Summary", "", _markdown_table(summary),
             "", "## Pareto-optimal artifacts (higher accuracy, smaller size)", ""]
    for group, front in _frontiers(summary):
        parts += [f"- `{r.artifact}` ({r.stage}/{r.method}, on {group}): accuracy {r.accuracy:.4f}, "
                  f"{r.size_bytes / 1024:.1f} KB, {r.bits:.2f} bits/param" for r in front.itertuples()]
    return "\n".join(parts) + "\n"


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}"
        "table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}th{background:#f0f0f0}tr:nth-child(even){background:#fafafa}img{max-width:100%}")


def _html(summary: pd.DataFrame, title: str, png: bytes) -> str:
    table = summary.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0, classes="summary")
    items = "".join(f"<li><code>{html.escape(str(r.artifact))}</code> on {html.escape(group)}: accuracy "
                    f"{r.accuracy:.4f}, {r.size_bytes / 1024:.1f} KB</li>"
                    for group, front in _frontiers(summary) for r in front.itertuples())
    image = base64.b64encode(png).decode("ascii")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
            f"<img alt=\"accuracy vs size\" src=\"data:image/png;base64,{image}\">\n"
            f"<h2>Summary</h2>\n{table}\n<h2>Pareto-optimal artifacts</h2>\n<ul>{items}</ul>\n</body></html>\n")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def render_report(summary: pd.DataFrame, out_dir: Path, title: str = "slimforge report") -> list[Path]:
    """Write accuracy_vs_size.png, report.md and report.html into ``out_dir``; return their paths."""
    summary = sort_by_stage(validate_summary(summary))
    if summary.empty:
        raise ValueError("render_report: the summary has no rows to report")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = _plot(summary, title)
    paths = [out_dir / PNG, out_dir / MARKDOWN, out_dir / HTML]
    for path, data in zip(paths, (png, _markdown(summary, title).encode(), _html(summary, title, png).encode())):
        _write_atomic(path, data)
    return paths
