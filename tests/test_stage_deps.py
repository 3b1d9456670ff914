"""dvc.yaml's code deps of each stage cover every module that stage's code imports.

A stage whose deps miss a module it imports is skipped by ``dvc repro`` after that module
changes, and its artifact goes stale under a current-looking dvc.lock. The check follows
imports statically (``import`` and ``from ... import`` anywhere in a file, lazy ones
included) from every file of ``tasks/<stage>``. ``slimforge/config.py`` is a leaf: it imports
every stage's params schema to parse params.yaml, and DVC tracks each stage's own params
section itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from slimforge import REPO_ROOT
from slimforge.artifacts import code_files, code_version

PACKAGES = ("slimforge", "tasks", "kernels")
LEAVES = {REPO_ROOT / "slimforge" / "config.py"}
STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    path = REPO_ROOT.joinpath(*name.split("."))
    if (path / "__init__.py").exists():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").exists() else None


def imported_files(source: Path) -> set[Path]:
    """Files of this repository's packages that ``source`` imports, parent packages included."""
    names = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    files = set()
    for name in names:
        parts = name.split(".")
        if parts[0] in PACKAGES:
            files |= {f for i in range(1, len(parts) + 1) if (f := module_file(".".join(parts[:i])))}
    return files


def stage_closure(stage: str) -> set[Path]:
    seen: set[Path] = set()
    todo = list((REPO_ROOT / "tasks" / stage).rglob("*.py"))
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        if f not in LEAVES:
            todo += imported_files(f) - seen
    return seen


@pytest.mark.parametrize("stage", list(STAGES))
def test_code_deps_cover_every_imported_module(stage):
    covered = set(code_files(stage))
    missing = sorted(f.relative_to(REPO_ROOT).as_posix() for f in stage_closure(stage) - covered)
    assert not missing, f"dvc.yaml: stage {stage!r} imports modules outside its deps: {missing}"


def test_code_version_follows_the_stage_deps_only():
    ingest = {f.relative_to(REPO_ROOT).as_posix() for f in code_files("ingest")}
    assert "tasks/ingest/stage.py" in ingest and not any(f.startswith("tasks/merge/") for f in ingest)
    assert code_version("ingest") != code_version("evaluate")
    assert set(code_files(None)) >= set(code_files("evaluate"))


def test_an_unknown_stage_is_refused_by_name():
    with pytest.raises(ValueError, match="no stage 'trian'.*ingest"):
        code_version("trian")
