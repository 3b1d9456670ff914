"""Pareto frontier and the rendered report (PNG, Markdown, self-contained HTML)."""

from __future__ import annotations

import base64
import re

import pandas as pd
import pytest

from tasks.evaluate.report import pareto_frontier, render_report
from tasks.evaluate.schema import SummaryError

BASE = {"method": "m", "evaluated_on": "test", "loss": 0.3, "ece": 0.02, "sparsity": 0.0, "bits": 32.0, "params": 1000,
        "latency_ms_b1": 0.1, "latency_ms_b256": 2.0}


def _rows(spec: list[tuple[str, str, float, int]], **extra) -> pd.DataFrame:
    return pd.DataFrame([{**BASE, "artifact": a, "stage": s, "accuracy": acc, "size_bytes": size, **extra}
                         for a, s, acc, size in spec])


def test_pareto_frontier_hand_example():
    df = _rows([("A", "train", 0.90, 1000), ("B", "prune", 0.95, 4000), ("C", "prune", 0.85, 2000),
                ("D", "quantize", 0.97, 8000), ("E", "quantize", 0.93, 8000)])
    # C is beaten by A (more accurate, smaller); E by B and D.
    assert pareto_frontier(df)["artifact"].tolist() == ["A", "B", "D"]


def test_pareto_frontier_keeps_exact_ties():
    df = _rows([("A", "train", 0.9, 1000), ("B", "prune", 0.9, 1000)])
    assert sorted(pareto_frontier(df)["artifact"]) == ["A", "B"]


def _summary() -> pd.DataFrame:
    test_rows = _rows([("quantize/int4", "quantize", 0.93, 40_000), ("train/base", "train", 0.95, 1_070_000),
                       ("prune/magnitude", "prune", 0.94, 300_000), ("prune/svd", "prune", 0.90, 500_000)])
    merged = _rows([("merge/ties", "merge", 0.88, 1_070_000), ("merge/average", "merge", 0.85, 1_070_000)],
                   evaluated_on="tasks-mean")
    per_task = _rows([("merge/ties", "merge", 0.91, 1_070_000)], evaluated_on="even-odd")
    return pd.concat([test_rows, merged, per_task], ignore_index=True)


def test_render_report_writes_png_markdown_and_html(tmp_path):
    paths = render_report(_summary(), tmp_path / "report", title="test <report>")
    assert [p.name for p in paths] == ["accuracy_vs_size.png", "report.md", "report.html"]
    png, md, page = paths[0].read_bytes(), paths[1].read_text(), paths[2].read_text()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")

    # Markdown: table in stage order, one line per Pareto-optimal artifact.
    table = [line for line in md.splitlines() if line.startswith("| ") and "artifact" not in line]
    assert [line.split(" | ")[0][2:] for line in table] == [
        "train/base", "prune/magnitude", "prune/svd", "quantize/int4", "merge/average", "merge/ties", "merge/ties"]
    front = [line for line in md.splitlines() if line.startswith("- `")]
    assert len(front) == 4  # test: int4, magnitude, base; tasks-mean: ties
    assert not any("prune/svd" in line or "merge/average" in line for line in front)

    # HTML: escaped title, the summary table, the PNG embedded as base64.
    assert "<title>test &lt;report&gt;</title>" in page
    assert "<table" in page and "prune/magnitude" in page and "latency_ms_b256" in page
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert embedded and base64.b64decode(embedded.group(1)) == png


def test_render_report_rejects_bad_or_empty_summary(tmp_path):
    bad = _summary()
    bad.loc[0, "accuracy"] = 1.2
    with pytest.raises(SummaryError):
        render_report(bad, tmp_path)
    with pytest.raises(ValueError, match="no rows"):
        render_report(_summary().iloc[:0], tmp_path)
    assert list(tmp_path.iterdir()) == []
