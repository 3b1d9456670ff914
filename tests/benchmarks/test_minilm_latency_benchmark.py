"""benchmarks/minilm_latency.py on a small run: agreement, speedup columns per batch and thread count, the plot."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]


def test_small_run_times_each_batch_and_plots(tmp_path):
    args = ["--variants", "int8 per-channel", "--sentences", "24", "--batch", "1", "3", "--threads", "1",
            "--repeats", "1", "--calibration", "8", "--gptq-calibration", "8", "--csv", str(tmp_path / "m.csv"),
            "--plot", str(tmp_path / "m.png")]
    done = subprocess.run([sys.executable, "-m", "benchmarks.minilm_latency", *args], check=False, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    df = pd.read_csv(tmp_path / "m.csv", index_col="model")
    assert list(df.index) == ["fp32", "int8 per-channel"]
    assert df.loc["fp32", "cosine_mean"] == pytest.approx(1.0)
    assert 0.99 < df.loc["int8 per-channel", "cosine_mean"] < 1.0  # int8 moves the embeddings, a little
    assert {"ms b1 1 thr", "ms b3 1 thr", "speedup b1 1 thr", "speedup b3 1 thr"} <= set(df.columns)
    assert (df["speedup b3 1 thr"] > 0).all() and df.loc["fp32", "speedup b1 1 thr"] == 1.0
    assert (tmp_path / "m.png").stat().st_size > 10_000
