"""Fixtures of the flow tests: a pipeline workspace copied from the repo, and the environment of
a ``slimforge``/Prefect subprocess (ephemeral API under a temporary PREFECT_HOME)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def e2e_root(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


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
