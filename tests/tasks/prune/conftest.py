"""Fixtures shared by the prune tests (digits_split lives in tests/tasks/conftest.py)."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here on one intra-op thread."""
