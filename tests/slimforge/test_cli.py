"""The CLI rejects bad params with exit status 2 and writes nothing."""

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def _cli(*args, cwd):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([BIN / "slimforge", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_validate_ok_and_bad(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  epochs: 2\n")
    assert _cli("validate", str(good), cwd=tmp_path).returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  init: kaimig\n")
    proc = _cli("validate", str(bad), cwd=tmp_path)
    assert proc.returncode == 2
    assert "bad.yaml: train.init: 'kaimig'" in proc.stderr


def test_run_with_bad_params_writes_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune:\n  sparsity: 1.5\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = _cli("run", "--params", str(bad), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "prune.sparsity: 1.5" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 3\n")
    proc = _cli("run", "--set", "train.epochs=zero", cwd=tmp_path)
    assert proc.returncode == 2 and "train.epochs: 'zero'" in proc.stderr
    assert (tmp_path / "params.yaml").read_text() == "train:\n  epochs: 3\n"


def test_help_on_every_command(tmp_path):
    for cmd in ([], ["run"], ["stage"], ["validate"], ["report"]):
        proc = _cli(*cmd, "--help", cwd=tmp_path)
        assert proc.returncode == 0 and "Usage" in proc.stdout
