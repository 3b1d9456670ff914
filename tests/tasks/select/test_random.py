import torch

from tasks.select.random import RandomConfig, select_random


def _labels():
    return torch.arange(10).repeat_interleave(torch.tensor([50, 40, 30, 60, 55, 45, 35, 65, 25, 95]))


def test_exact_size_and_stratified_counts():
    y = _labels()
    idx = select_random(y, RandomConfig(keep_fraction=0.3), torch.Generator().manual_seed(0))
    assert len(idx) == int(len(y) * 0.3)
    assert len(torch.unique(idx)) == len(idx)
    counts = torch.bincount(y[idx], minlength=10).double()
    expected = torch.bincount(y, minlength=10).double() * 0.3
    assert (counts - expected).abs().max() <= 1.0


def test_same_seed_same_indices_other_seed_different():
    y = _labels()
    cfg = RandomConfig(keep_fraction=0.5, stratified=False)
    a = select_random(y, cfg, torch.Generator().manual_seed(1))
    b = select_random(y, cfg, torch.Generator().manual_seed(1))
    c = select_random(y, cfg, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(a) == len(y) // 2
