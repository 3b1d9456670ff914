"""Render the summary table, its plots and what else is known about a run as a Markdown report and
a static, self-contained HTML page (plots embedded as PNG data URIs, the lineage as inline SVG).

A pure renderer: DataFrames, dicts and strings in, files out. The plots (``tasks/evaluate/plots.py``)
are accuracy against size with the Pareto frontier of (higher accuracy, smaller size) per
evaluation group, against sparsity, against bits per parameter, and per task for merges; a plot
whose rows are absent is left out. Optional sections (promotion verdict, comparisons against the
baselines, seed statistics, lineage) appear only when their input is given.
"""

from __future__ import annotations

import base64
import html
import os
import re
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.evaluate.plots import PLOT_GROUPS, PLOTS, pareto_frontier, to_png
from tasks.evaluate.schema import STAGES, validate_summary

MARKDOWN, HTML = "report.md", "report.html"
COMPARISON_COLUMNS = ("artifact", "baseline", "difference", "low", "high")
PROMOTION_KEYS = ("promote", "reason")

__all__ = ["pareto_frontier", "render_report", "sort_by_stage"]

# (heading, Markdown body or None, HTML body or None): a section may exist in one format only.
Section = tuple[str, str | None, str | None]


def sort_by_stage(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in pipeline order (ingest ... merge), then by artifact and evaluated_on."""
    order = df["stage"].map({s: i for i, s in enumerate(STAGES)})
    return (df.assign(_order=order).sort_values(["_order", "artifact", "evaluated_on"], kind="stable")
            .drop(columns="_order").reset_index(drop=True))


def _cell(value: object) -> str:
    """One displayed value: floats to 4 significant digits, booleans as yes/no, lists as [a, b]."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return str(value)


def _markdown_table(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(_cell(v).replace("|", "\\|") for v in row) + " |"
              for row in df.itertuples(index=False)]
    return "\n".join(lines)


_NUMBER = ' class="n"'  # right-aligned, so digits line up; text stays left-aligned


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def _html_table(df: pd.DataFrame, cls: str) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td{_NUMBER if _is_number(v) else ''}>{html.escape(_cell(v))}</td>" for v in row)
                   + "</tr>\n" for row in df.itertuples(index=False))
    # The wrapper scrolls a wide table sideways instead of widening the page.
    return (f'<div class="scroll"><table class="{cls}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n'
            "</table></div>")


def _frontiers(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    return [(g, pareto_frontier(summary[summary["evaluated_on"] == g])) for g in PLOT_GROUPS
            if (summary["evaluated_on"] == g).any()]


def _pareto_section(summary: pd.DataFrame) -> Section:
    md, items = [], []
    for group, front in _frontiers(summary):
        for r in front.itertuples():
            md.append(f"- `{r.artifact}` ({r.stage}/{r.method}, on {group}): accuracy {r.accuracy:.4f}, "
                      f"{r.size_bytes / 1024:.1f} KB, {r.bits:.2f} bits/param")
            items.append(f"<li><code>{html.escape(str(r.artifact))}</code> ({html.escape(f'{r.stage}/{r.method}')}, "
                         f"on {html.escape(group)}): accuracy {r.accuracy:.4f}, {r.size_bytes / 1024:.1f} KB, "
                         f"{r.bits:.2f} bits/param</li>")
    return ("Pareto-optimal artifacts (higher accuracy, smaller size)", "\n".join(md),
            f"<ul>{''.join(items)}</ul>")


def _plots_section(figures: dict[str, tuple[str, bytes]]) -> Section:
    md = "\n\n".join(f"![{alt}]({name})" for name, (alt, _) in figures.items())
    page = "\n".join(f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,'
                     f'{base64.b64encode(png).decode("ascii")}"><figcaption>{html.escape(alt)}</figcaption></figure>'
                     for alt, png in figures.values())
    return "Plots", md, page


def _promotion_section(promotion: dict) -> Section:
    verdict = "Promoted" if promotion["promote"] else "Not promoted"
    extra = {k: v for k, v in promotion.items() if k not in PROMOTION_KEYS}
    md = f"**{verdict}.** {promotion['reason']}" + "".join(f"\n- {k}: {_cell(v)}" for k, v in extra.items())
    items = "".join(f"<li>{html.escape(str(k))}: {html.escape(_cell(v))}</li>" for k, v in extra.items())
    cls = "promoted" if promotion["promote"] else "held"
    page = (f'<p class="verdict {cls}"><strong>{verdict}.</strong> {html.escape(str(promotion["reason"]))}</p>'
            + (f"<ul>{items}</ul>" if items else ""))
    return "Promotion", md, page


def _stats_frame(stats: dict) -> pd.DataFrame:
    """A flat dict as (statistic, value) rows; a dict of dicts as one row per outer key."""
    if stats and all(isinstance(v, dict) for v in stats.values()):
        return pd.DataFrame.from_dict(stats, orient="index").rename_axis("metric").reset_index()
    return pd.DataFrame({"statistic": list(stats), "value": pd.Series(list(stats.values()), dtype=object)})


def _table_section(heading: str, df: pd.DataFrame, cls: str) -> Section:
    return heading, _markdown_table(df), _html_table(df, cls)


def _sections(summary: pd.DataFrame, figures: dict[str, tuple[str, bytes]], extras: dict) -> list[Section]:
    """Every section in reading order; optional ones only when their input is given."""
    out: list[Section] = []
    if extras["promotion"] is not None:
        out.append(_promotion_section(extras["promotion"]))
    if figures:
        out.append(_plots_section(figures))
    out += [_table_section("Summary", summary, "summary"), _pareto_section(summary)]
    if extras["comparisons"] is not None:
        out.append(_table_section("Against the baselines", extras["comparisons"], "comparisons"))
    if extras["seed_stats"] is not None:
        out.append(_table_section("Seed statistics", _stats_frame(extras["seed_stats"]), "seed-stats"))
    svg, mermaid = extras["lineage_svg"], extras["lineage_mermaid"]
    if svg is not None or mermaid is not None:
        out.append(("Lineage", None if mermaid is None else f"```mermaid\n{mermaid.strip()}\n```",
                    None if svg is None else f'<div class="lineage">{svg}</div>'))
    return out


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")


def _markdown(title: str, sections: list[Section]) -> str:
    parts = [f"# {title}"] + [f"## {heading}\n\n{md}" for heading, md, _ in sections if md is not None]
    return "\n\n".join(parts) + "\n"


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}"
        "table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px;"
        "text-align:left}td.n{text-align:right}th{background:#f0f0f0}"
        "tr:nth-child(even){background:#fafafa}img{max-width:100%}figure{margin:1em 0}"
        "figcaption{color:#666;font-size:13px}.verdict{padding:8px 12px;border-radius:4px}"
        ".promoted{background:#e6f4ea}.held{background:#fdecea}.lineage,.scroll{overflow-x:auto}")


def _html(title: str, sections: list[Section]) -> str:
    body = "\n".join(f'<section id="{_slug(heading)}">\n<h2>{html.escape(heading)}</h2>\n{page}\n'
                     "</section>" for heading, _, page in sections if page is not None)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def _check_extras(extras: dict) -> None:
    """Refuse malformed optional inputs before any file is written."""
    comparisons, promotion, svg = extras["comparisons"], extras["promotion"], extras["lineage_svg"]
    if comparisons is not None:
        missing = [c for c in COMPARISON_COLUMNS if c not in comparisons.columns]
        if missing:
            raise ValueError(f"render_report: comparisons lacks columns {missing}; "
                             f"expected {list(COMPARISON_COLUMNS)}, got {list(comparisons.columns)}")
    if promotion is not None and any(k not in promotion for k in PROMOTION_KEYS):
        raise ValueError(f"render_report: promotion needs keys {list(PROMOTION_KEYS)}, got {sorted(promotion)}")
    if svg is not None and "<svg" not in svg:
        raise ValueError(f"render_report: lineage_svg is not an inline SVG (no <svg element): {svg[:60]!r}")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def render_report(summary: pd.DataFrame, out_dir: Path, title: str = "slimforge report", *,
                  lineage_svg: str | None = None, lineage_mermaid: str | None = None,
                  comparisons: pd.DataFrame | None = None, promotion: dict | None = None,
                  seed_stats: dict | None = None) -> list[Path]:
    """Write the plots (PNG), report.md and report.html into ``out_dir``; return their paths.

    ``lineage_svg`` is embedded as-is in the HTML, ``lineage_mermaid`` as a mermaid block in the
    Markdown; ``comparisons`` has columns artifact, baseline, difference, low, high; ``promotion``
    has keys promote and reason. A plot file of an earlier render that has no rows now is removed.
    """
    summary = sort_by_stage(validate_summary(summary))
    if summary.empty:
        raise ValueError("render_report: the summary has no rows to report")
    extras = {"lineage_svg": lineage_svg, "lineage_mermaid": lineage_mermaid, "comparisons": comparisons,
              "promotion": promotion, "seed_stats": seed_stats}
    _check_extras(extras)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {name: (alt, to_png(fig)) for name, (alt, plot) in PLOTS.items()
               if (fig := plot(summary)) is not None}
    sections = _sections(summary, figures, extras)
    paths = []
    for name, data in [*((n, png) for n, (_, png) in figures.items()),
                       (MARKDOWN, _markdown(title, sections).encode()), (HTML, _html(title, sections).encode())]:
        _write_atomic(out_dir / name, data)
        paths.append(out_dir / name)
    for stale in PLOTS.keys() - figures.keys():
        (out_dir / stale).unlink(missing_ok=True)
    return paths
