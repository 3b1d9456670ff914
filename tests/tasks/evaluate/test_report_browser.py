"""The rendered report in a real headless Chromium: it paints, loads without console errors, decodes
every embedded plot, draws the lineage SVG and shows every section.

Skipped when ``chromium`` is not on PATH (``make browser`` installs it on Debian as root or via sudo).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from matplotlib import image

from tasks.evaluate.report import render_report

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not on PATH; `make browser` installs it (Debian, as root or via sudo)")

SECTIONS = ["Promotion", "Plots", "Summary", "Pareto-optimal artifacts (higher accuracy, smaller size)",
            "Against the baselines", "Seed statistics", "Lineage"]
LINEAGE_SVG = ('<svg xmlns="http://www.w3.org/2000/svg" width="360" height="60" role="img">'
               '<rect x="5" y="15" width="90" height="30" fill="#cde"/><text x="20" y="35">train</text>'
               '<line x1="95" y1="30" x2="175" y2="30" stroke="#333"/>'
               '<rect x="175" y="15" width="90" height="30" fill="#dec"/><text x="190" y="35">prune</text></svg>')
# Appended to a copy of the page: after load, the body records what the browser made of it.
PROBE = """<script>addEventListener("load", () => {
  const b = document.body.dataset, svg = document.querySelector(".lineage svg").getBBox();
  b.images = [...document.images].map(i => i.complete ? i.naturalWidth : -1).join(",");
  b.svg = svg.width + "x" + svg.height;
  b.overflow = document.documentElement.scrollWidth - innerWidth;
});</script>"""


def _row(artifact, stage, on, accuracy, size, **extra) -> dict:
    return {"artifact": artifact, "stage": stage, "method": "m", "evaluated_on": on, "accuracy": accuracy,
            "loss": 0.3, "ece": 0.02, "size_bytes": size, "sparsity": 0.0, "bits": 32.0, "params": 206922,
            "latency_ms_b1": 0.27, "latency_ms_b256": 22.5, **extra}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    summary = pd.DataFrame([
        _row("train", "train", "test", 0.982, 828344), _row("prune", "prune", "test", 0.979, 192990, sparsity=0.8),
        _row("quantize/int4", "quantize", "test", 0.978, 134568, bits=5.2),
        *[_row("finetune/" + t, "finetune", t, a, 828344) for t, a in (("flip", 0.933), ("rot90", 0.948))],
        *[_row(a, a, t, acc, 839008) for a, t, acc in (("train", "flip", 0.427), ("train", "rot90", 0.155),
                                                       ("train", "tasks-mean", 0.291), ("merge", "flip", 0.557),
                                                       ("merge", "rot90", 0.672), ("merge", "tasks-mean", 0.6145))]])
    comparisons = pd.DataFrame({"artifact": ["prune"], "baseline": ["train"], "difference": [-0.003],
                                "low": [-0.0061], "high": [0.0001]})
    out = tmp_path_factory.mktemp("report")
    render_report(summary, out, "browser check", lineage_svg=LINEAGE_SVG, lineage_mermaid="graph LR\n train --> prune",
                  comparisons=comparisons, promotion={"promote": True, "reason": "within 0.5 pt of train"},
                  seed_stats={"n": 3, "mean": 0.981, "std": 0.001, "ci95": [0.9785, 0.9835]})
    return out / "report.html"


def _chromium(page: Path, *args: str, timeout: float = 20.0) -> tuple[str, str]:
    """(stdout, stderr) of one headless Chromium on ``page``; its whole process group ends with it."""
    profile = page.parent / f".chromium-{page.stem}"  # a fresh profile: nothing read from or left in ~
    cmd = [CHROMIUM, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args, page.as_uri()]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium did not finish within {timeout} s on {page}")
    finally:
        try:  # renderer or GPU helpers still alive after the browser process exited
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}:\n{err[-2000:]}"
    return out, err


def _console_messages(stderr: str) -> list[str]:
    """The page's console output in Chromium's log (uncaught errors and console.* calls alike)."""
    return [line for line in stderr.splitlines() if re.search(r"CONSOLE[:(]\d+|Uncaught", line)]


def test_screenshot_is_a_painted_page(report, tmp_path):
    shot = tmp_path / "report.png"
    _chromium(report, f"--screenshot={shot}", "--window-size=1280,2000")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    pixels = image.imread(shot)[..., :3]  # (2000, 1280, 3) floats in [0, 1]
    assert pixels.shape == (2000, 1280, 3)
    grey = pixels.mean(axis=2)
    assert grey.std() > 0.05, f"the screenshot is nearly uniform (std {grey.std():.4f})"
    # Text, plots and table borders: a real page darkens a fair share of the window.
    assert 0.02 < (grey < 0.9).mean() < 0.9, f"{(grey < 0.9).mean():.3f} of the pixels are not near white"


def test_page_loads_cleanly_and_shows_every_section(report):
    probe = report.with_name("probe.html")
    probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    dom, log = _chromium(probe, "--dump-dom", "--window-size=1280,2000")
    assert _console_messages(log) == []
    body = re.search(r'<body data-images="([^"]*)" data-svg="([^"]*)" data-overflow="([^"]*)"', dom)
    assert body, f"the load probe did not run:\n{dom[:500]}"
    widths = [int(w) for w in body.group(1).split(",")]
    plots = ["accuracy_vs_size.png", "accuracy_vs_sparsity.png", "accuracy_vs_bits.png", "accuracy_per_task.png"]
    assert widths == [image.imread(report.with_name(p)).shape[1] for p in plots], f"plots decoded to widths {widths}"
    width, height = map(float, body.group(2).split("x"))
    assert width > 200 and height > 10, f"the lineage SVG is drawn at {width}x{height}"
    assert int(body.group(3)) <= 0, "the page is wider than the window"
    assert re.findall(r"<h2>(.*?)</h2>", dom) == SECTIONS
    assert "<h1>browser check</h1>" in dom


def test_console_errors_would_be_seen(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>undefinedFunction()</script></body></html>")
    _, log = _chromium(bad, "--dump-dom")
    assert any("Uncaught ReferenceError" in line for line in _console_messages(log)), log[-2000:]
