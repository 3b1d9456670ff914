"""`flows`, `tasks` and `kernels` are also names of unrelated PyPI packages: make sure the
modules imported are this repository's."""

import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["slimforge", "flows", "tasks", "kernels"])
def test_imported_package_is_this_repository(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == REPO / name
