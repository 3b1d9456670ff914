"""Fixtures shared by the method tests of several stages."""

import pytest
import torch
from sklearn.datasets import load_digits


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run much faster on one intra-op thread on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_split():
    """sklearn digits as (x_train, y_train, x_test, y_test): 1,200 / 597, pixels in [0, 1]."""
    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)  # (1797, 64), (1797,)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1200], y[:1200], x[1200:], y[1200:]
