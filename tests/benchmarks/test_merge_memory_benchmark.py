"""benchmarks/merge_memory.py --quick: both merges run in fresh children and agree bit for bit."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_writes_rows_and_table(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.merge_memory", "--quick", "--out", str(tmp_path),
                           "--workdir", str(tmp_path)],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    df = pd.read_csv(tmp_path / "merge_memory.csv").set_index(["method", "mode"])
    assert sorted(df.index) == [("task_arithmetic", "naive"), ("task_arithmetic", "stream"),
                                ("ties", "naive"), ("ties", "stream")]
    assert df.identical.all()  # the streamed and the in-memory merge wrote the same tensors
    assert (df.peak_mib >= df.idle_mib).all() and (df.seconds > 0).all()
    assert "| task_arithmetic | stream" in done.stdout
    assert (tmp_path / "merge_memory.md").read_text().count("| ties") == 2
    assert not list(tmp_path.glob("merge_memory_*"))  # the checkpoints' temp dir is gone
