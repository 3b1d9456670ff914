"""benchmarks/kernels.py --quick: every section runs, and every kernel computes the dense answer."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]


def quick_run(out: Path, *args: str, **env: str) -> pd.DataFrame:
    done = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--quick", "--out", str(out), *args],
                          check=False, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return pd.read_csv(out / "kernels.csv")


def test_quick_run_reports_every_kernel_with_its_accuracy(tmp_path):
    df = quick_run(tmp_path)
    assert set(df.section) == {"matmul", "merge", "qat step"}
    mm = df[df.section == "matmul"].set_index(["batch", "kernel"])
    for batch in (1, 16):
        # the reference W4A16 dequantizes the very weights the dense baseline holds
        assert mm.loc[(batch, "W4A16 g128 (torch)"), "SQNR dB vs dense"] > 60
        assert mm.loc[(batch, "W8A8 per-token (torch)"), "SQNR dB vs dense"] > 30  # int8 weights and activations
        assert mm.loc[(batch, "int4 g128 w-only packed (torch CPU op)"), "SQNR dB vs dense"] > 35  # bf16 activations
    assert (df.ms > 0).all() and df.ms.map(math.isfinite).all()
    merge = df[df.section == "merge"]
    assert set(merge.kernel) == {"ties (torch reference)", "dare (torch reference)", "dare+ties (torch reference)"}
    assert (merge["MB moved"] == round(4 * 16384 * 4 / 1e6, 2)).all()  # (K + 2)·n·4 bytes at K = 2
    qat = df[df.section == "qat step"].set_index("kernel")
    assert set(qat.index) == {"fp", "lsq torch", "lsq fused"} and qat.loc["fp", "step cost vs fp"] == 1
    assert (tmp_path / "kernels.png").stat().st_size > 0 and "| matmul" in (tmp_path / "kernels.md").read_text()


def test_quick_run_of_the_triton_paths_under_the_interpreter(tmp_path):
    """The GPU rows' code paths (Triton matmuls, the fused merge and fake-quant) on CPU through
    TRITON_INTERPRET=1: their answers, not their speed."""
    pytest.importorskip("triton")
    df = quick_run(tmp_path, "--kernel", "triton", TRITON_INTERPRET="1")
    mm = df[df.section == "matmul"].set_index(["batch", "kernel"])
    for batch in (1, 16):
        assert mm.loc[(batch, "W4A16 g128 (triton)"), "SQNR dB vs dense"] > 60
        assert mm.loc[(batch, "W8A8 per-token (triton)"), "SQNR dB vs dense"] > 30
    fused = df[df.kernel.str.endswith("(triton, fused)")]
    assert len(fused) == 3 and (fused["max |diff| vs torch"] == 0).all()
    assert "lsq fused" in set(df.kernel)
