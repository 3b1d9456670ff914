"""benchmarks/quantize.py --quick: every variant goes through save_packed and the real loader."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_writes_rows_table_and_plot(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.quantize", "--quick", "--out", str(tmp_path)],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    df = pd.read_csv(tmp_path / "quantize.csv").set_index(["method", "bits", "granularity"])
    # rtn and gptq at 8/4-bit × channel/group, smoothquant only at 8-bit channel, plus fp32
    assert len(df) == 10
    assert ("smoothquant", 8, "channel") in df.index and ("smoothquant", 4, "channel") not in df.index
    assert "skipped cnn smoothquant 4-bit channel" in done.stdout
    fp32 = df.loc[("fp32", 32, "-")]
    for method in ("rtn", "gptq"):
        w8, w4 = df.loc[(method, 8, "channel")], df.loc[(method, 4, "channel")]
        assert w4.bytes < w8.bytes < fp32.bytes / 3  # packed codes, not fp32 with a format label
        assert abs(w8.test_accuracy - fp32.test_accuracy) <= 0.02  # int8 per channel barely moves a CNN
    assert (df.drop(index=("fp32", 32, "-")).ms_b256 > 0).all()
    assert "Int8Linear" in df.loc[("rtn", 8, "channel"), "kernels"]  # the real int8 op ran
    assert "| rtn " in done.stdout  # the markdown table
    assert (tmp_path / "quantize.png").stat().st_size > 0
