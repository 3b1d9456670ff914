"""benchmarks/barrier.py --quick: curves, summary and plot of one tiny pair on real MNIST-5k."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_writes_curves_summary_and_plot(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.barrier", "--quick", "--out", str(tmp_path)],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    curves = pd.read_csv(tmp_path / "barrier.csv")
    assert len(curves) == 2 * 2 * 11  # naive/aligned × train/test × 11 α
    assert set(curves.curve) == {"naive", "aligned"} and set(curves.split) == {"train", "test"}
    by = curves.set_index(["curve", "split", "alpha"])
    for split in ("train", "test"):  # both paths start at A; aligned B computes what B does
        assert by.loc[("naive", split, 0.0), "loss"] == by.loc[("aligned", split, 0.0), "loss"]
        assert abs(by.loc[("naive", split, 1.0), "loss"] - by.loc[("aligned", split, 1.0), "loss"]) < 1e-5
    summary = pd.read_csv(tmp_path / "barrier_summary.csv").set_index("split")
    assert (summary.loss_barrier_naive >= 0).all() and (summary.loss_barrier_aligned >= 0).all()
    assert (summary.l2_aligned < summary.l2_naive).all()  # matching moved B towards A
    assert "mean ± std over 1 pair(s)" in done.stdout and "| test " in done.stdout
    assert (tmp_path / "barrier.png").read_bytes()[:4] == b"\x89PNG"
