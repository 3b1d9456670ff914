"""Pareto frontier, the plots and the rendered report (PNGs, Markdown, self-contained HTML)."""

from __future__ import annotations

import base64
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from tasks.evaluate.plots import FINE_TUNED, plot_accuracy_vs_size, task_accuracies
from tasks.evaluate.report import pareto_frontier, render_report
from tasks.evaluate.schema import SummaryError, read_summary, write_summary

BASE = {"method": "m", "evaluated_on": "test", "loss": 0.3, "ece": 0.02, "sparsity": 0.0, "bits": 32.0, "params": 1000,
        "latency_ms_b1": 0.1, "latency_ms_b256": 2.0}
PLOT_FILES = ["accuracy_vs_size.png", "accuracy_vs_sparsity.png", "accuracy_vs_bits.png", "accuracy_per_task.png"]
REPO_SUMMARY = Path(__file__).resolve().parents[3] / "metrics" / "summary.csv"


def _rows(spec: list[tuple[str, str, float, int]], **extra) -> pd.DataFrame:
    return pd.DataFrame([{**BASE, "artifact": a, "stage": s, "accuracy": acc, "size_bytes": size, **extra}
                         for a, s, acc, size in spec])


def test_pareto_frontier_hand_example():
    df = _rows([("D", "quantize", 0.97, 8000), ("C", "prune", 0.85, 2000), ("A", "train", 0.90, 1000),
                ("E", "quantize", 0.93, 8000), ("B", "prune", 0.95, 4000)])
    # C is beaten by A (more accurate, smaller); E by D (same size, more accurate) and B.
    expected = df.loc[[2, 4, 0]]  # A, B, D: by size
    pd.testing.assert_frame_equal(pareto_frontier(df), expected)
    # The plotted step line runs through exactly those points, in that order.
    fig = plot_accuracy_vs_size(df)
    (step,) = [line for line in fig.axes[0].get_lines() if line.get_label() == "Pareto frontier"]
    assert list(step.get_xdata()) == pytest.approx([1000 / 1024, 4000 / 1024, 8000 / 1024])
    assert list(step.get_ydata()) == pytest.approx([0.90, 0.95, 0.97])


def test_pareto_frontier_keeps_exact_ties():
    df = _rows([("A", "train", 0.9, 1000), ("B", "prune", 0.9, 1000)])
    assert sorted(pareto_frontier(df)["artifact"]) == ["A", "B"]


def _summary() -> pd.DataFrame:
    test_rows = _rows([("quantize/int4", "quantize", 0.93, 40_000), ("train/base", "train", 0.95, 1_070_000),
                       ("prune/magnitude", "prune", 0.94, 300_000), ("prune/svd", "prune", 0.90, 500_000)])
    test_rows.loc[0, "bits"], test_rows.loc[2, "sparsity"], test_rows.loc[3, "sparsity"] = 4.25, 0.8, 0.5
    merged = _rows([("merge/ties", "merge", 0.88, 1_070_000), ("merge/average", "merge", 0.85, 1_070_000)],
                   evaluated_on="tasks-mean")
    per_task = _rows([("merge/ties", "merge", 0.91, 1_070_000), ("merge/ties", "merge", 0.85, 1_070_000),
                      ("finetune/even-odd", "finetune", 0.99, 1_070_000), ("finetune/flip", "finetune", 0.97, 1)])
    per_task["evaluated_on"] = ["even-odd", "flip", "even-odd", "flip"]
    return pd.concat([test_rows, merged, per_task], ignore_index=True)


def test_render_report_writes_plots_markdown_and_html(tmp_path):
    paths = render_report(_summary(), tmp_path / "report", title="test <report>")
    assert [p.name for p in paths] == [*PLOT_FILES, "report.md", "report.html"]
    pngs, md, page = [p.read_bytes() for p in paths[:4]], paths[4].read_text(), paths[5].read_text()
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in pngs)

    # Markdown: table in stage order, one line per Pareto-optimal artifact, every plot linked.
    table = [line for line in md.splitlines() if line.startswith("| ") and "artifact" not in line]
    assert [line.split(" | ")[0][2:] for line in table] == [
        "train/base", "finetune/even-odd", "finetune/flip", "prune/magnitude", "prune/svd", "quantize/int4",
        "merge/average", "merge/ties", "merge/ties", "merge/ties"]
    front = [line for line in md.splitlines() if line.startswith("- `")]
    assert len(front) == 4  # test: int4, magnitude, base; tasks-mean: ties
    assert not any("prune/svd" in line or "merge/average" in line for line in front)
    assert all(f"]({name})" in md for name in PLOT_FILES)

    # HTML: escaped title, the summary table, each PNG embedded as base64 exactly as written.
    assert "<title>test &lt;report&gt;</title>" in page
    assert "<table" in page and "prune/magnitude" in page and "latency_ms_b256" in page
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [base64.b64decode(e) for e in embedded] == pngs


def test_task_accuracies_match_the_summary():
    table = task_accuracies(_summary())
    assert list(table.index) == ["even-odd", "flip", "tasks-mean"]
    assert list(table.columns) == [FINE_TUNED, "merge/ties", "merge/average"]  # summary order
    assert table.loc["even-odd", "merge/ties"] == 0.91 and table.loc["flip", "merge/ties"] == 0.85
    assert table.loc["tasks-mean", "merge/ties"] == 0.88 and table.loc["tasks-mean", "merge/average"] == 0.85
    assert math.isnan(table.loc["flip", "merge/average"])  # no such row: no bar, not a zero bar
    # The fine-tuned reference of each task is finetune/<task> on that task; its mean beside tasks-mean.
    assert list(table[FINE_TUNED]) == pytest.approx([0.99, 0.97, 0.98])


def test_plots_without_rows_are_left_out(tmp_path):
    out = tmp_path / "report"
    render_report(_summary(), out)
    only_train = _rows([("train", "train", 0.9, 1000), ("train/seed-1", "train", 0.91, 1000)])
    paths = render_report(only_train, out)
    assert [p.name for p in paths] == ["accuracy_vs_size.png", "report.md", "report.html"]
    # The plots of the earlier render that have no rows now are gone, and nothing links them.
    assert sorted(p.name for p in out.iterdir()) == ["accuracy_vs_size.png", "report.html", "report.md"]
    assert "sparsity.png" not in paths[1].read_text() and paths[2].read_text().count("<img") == 1


def test_optional_sections_only_when_given(tmp_path):
    plain = render_report(_summary(), tmp_path / "plain")
    for text in (plain[-2].read_text(), plain[-1].read_text()):
        assert not any(h in text for h in ("Lineage", "Against the baselines", "Promotion", "Seed statistics"))
    svg = '<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20"><rect width="40" height="20"/></svg>'
    comparisons = pd.DataFrame({"artifact": ["prune/magnitude"], "baseline": ["train/base"], "difference": [-0.0104],
                                "low": [-0.0151], "high": [-0.00573]})
    full = render_report(_summary(), tmp_path / "full", lineage_svg=svg, lineage_mermaid="graph LR\n  train --> prune",
                         comparisons=comparisons, promotion={"promote": False, "reason": "accuracy fell > 1 pt"},
                         seed_stats={"n": 3, "mean": 0.92, "std": 0.02, "ci95": [0.8703, 0.9697]})
    md, page = full[-2].read_text(), full[-1].read_text()
    assert f'<div class="lineage">{svg}</div>' in page  # as-is, not escaped
    assert "```mermaid\ngraph LR\n  train --> prune\n```" in md and "<svg" not in md
    assert "| prune/magnitude | train/base | -0.0104 | -0.0151 | -0.00573 |" in md
    assert "**Not promoted.** accuracy fell > 1 pt" in md and "accuracy fell &gt; 1 pt" in page
    assert "| ci95 | [0.8703, 0.9697] |" in md and "<td>n</td><td class=\"n\">3</td>" in page
    for heading in ("Promotion", "Plots", "Summary", "Against the baselines", "Seed statistics", "Lineage"):
        assert f"<h2>{heading}</h2>" in page
        assert f"## {heading}" in md


def test_render_report_rejects_bad_or_empty_summary(tmp_path):
    bad = _summary()
    bad.loc[0, "accuracy"] = 1.2
    with pytest.raises(SummaryError):
        render_report(bad, tmp_path)
    with pytest.raises(ValueError, match="no rows"):
        render_report(_summary().iloc[:0], tmp_path)
    with pytest.raises(ValueError, match=r"comparisons lacks columns \['low', 'high'\]"):
        render_report(_summary(), tmp_path, comparisons=pd.DataFrame(columns=["artifact", "baseline", "difference"]))
    with pytest.raises(ValueError, match="promotion needs keys"):
        render_report(_summary(), tmp_path, promotion={"promote": True})
    with pytest.raises(ValueError, match="not an inline SVG"):
        render_report(_summary(), tmp_path, lineage_svg="graph LR; a --> b")
    assert list(tmp_path.iterdir()) == []


class _Tables(HTMLParser):
    """Cell texts of every <table>, keyed by its class: {class: [[cell, ...], ...]} (header row first)."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table = self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._table = self.tables.setdefault(dict(attrs).get("class", ""), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _markdown_rows(md: str, header: str) -> list[list[str]]:
    """Cells of the Markdown table that follows ``## header`` (header row first, rule dropped)."""
    block = md.split(f"## {header}\n\n", 1)[1].split("\n\n", 1)[0]
    rows = [line[2:-2].split(" | ") for line in block.splitlines() if line.startswith("| ")]
    return [[cell.replace("\\|", "|") for cell in row] for row in rows]


def _assert_shows(cell: str, value: object, where: str) -> None:
    """The displayed cell is the value: text exactly, integers exactly, floats to 4 significant digits."""
    if isinstance(value, str):
        assert cell == value, where
    elif isinstance(value, int):
        assert cell == str(value), where
    else:
        shown = float(cell)
        half_unit = 0.5 * 10 ** (math.floor(math.log10(abs(value))) - 3) if value else 0.0
        assert abs(shown - value) <= half_unit * (1 + 1e-9), f"{where}: shows {cell}, metric is {value!r}"


def _assert_table_is_summary(rows: list[list[str]], expected: pd.DataFrame, fmt: str) -> None:
    header, body = rows[0], rows[1:]
    assert header == list(expected.columns), fmt
    want = {(r["artifact"], r["evaluated_on"]): r for r in expected.to_dict("records")}
    got = {(row[0], row[3]): row for row in body}
    assert len(body) == len(expected) and got.keys() == want.keys(), fmt
    for key, row in got.items():
        for column, cell in zip(header, row):
            value = want[key][column]
            if pd.api.types.is_integer_dtype(expected[column]):
                value = int(value)
            _assert_shows(cell, value, f"{fmt} {key} {column}")


def _awkward_summary() -> pd.DataFrame:
    """Values that round: repeating decimals, a value near 1, tiny latencies, a name with a pipe."""
    df = _summary()
    df.loc[0, ["accuracy", "loss", "latency_ms_b1"]] = [0.21833333333333335, 5.874229431152344, 0.000123456]
    df.loc[1, ["bits", "ece", "sparsity"]] = [32.02536221378104, 0.010455769389867782, 0.8000009674173826]
    df.loc[2, ["artifact", "accuracy", "latency_ms_b256"]] = ["prune/a|b", 0.9995, 12345.678]
    return df


@pytest.mark.parametrize("source", ["constructed", "repository"])
def test_every_number_in_the_tables_is_the_metric(tmp_path, source):
    if source == "repository" and not REPO_SUMMARY.is_file():
        pytest.skip(f"{REPO_SUMMARY} is absent; `make run` writes it")
    csv = REPO_SUMMARY if source == "repository" else write_summary(_awkward_summary(), tmp_path / "summary.csv")
    expected = read_summary(csv)
    comparisons = pd.DataFrame({"artifact": ["a"], "baseline": ["b"], "difference": [-0.010416666666666666],
                                "low": [-0.0151234], "high": [0.004]})
    paths = render_report(expected, tmp_path / "report", comparisons=comparisons)
    parser = _Tables()
    parser.feed(paths[-1].read_text())
    md = paths[-2].read_text()
    _assert_table_is_summary(parser.tables["summary"], expected, "HTML")
    _assert_table_is_summary(_markdown_rows(md, "Summary"), expected, "Markdown")
    for fmt, rows in (("HTML", parser.tables["comparisons"]), ("Markdown", _markdown_rows(md, "Against the baselines"))):
        assert rows[0] == list(comparisons.columns)
        for column, cell in zip(rows[0], rows[1]):
            _assert_shows(cell, comparisons.loc[0, column], f"{fmt} comparisons {column}")
