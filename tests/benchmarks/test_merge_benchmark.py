"""benchmarks/merge.py --quick: every method runs through the stage's runners on two tasks."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_writes_rows_table_and_plot(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.merge", "--quick", "--out", str(tmp_path)],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    df = pd.read_csv(tmp_path / "merge.csv").set_index("method")
    assert {"base", "finetuned", "average", "greedy_soup", "task_arithmetic", "ties", "dare", "dare_ties",
            "adamerging_task", "adamerging_layer", "adamerging_layer_labelled", "ties->int4", "int4->ties"} == set(df.index)
    assert (df.loc["finetuned", "normalized"] == 1.0) and df.normalized.between(0, 2).all()
    # the parity task's labels are 0/1: its fine-tune must beat the 10-class base head on it by far
    assert df.loc["finetuned", "acc_1"] > df.loc["base", "acc_1"]
    assert (tmp_path / "merge.png").stat().st_size > 0 and "| ties " in done.stdout
