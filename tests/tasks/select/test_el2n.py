import math

import torch
from sklearn.datasets import load_digits

from slimforge.models import MLPConfig, build_model
from tasks.select.el2n import El2nConfig, el2n, el2n_scores, keep_highest
from tasks.train.init import initialize


def _digits():
    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)


def test_el2n_range_and_perfect_prediction_scores_zero():
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([100.0, 0.0, 0.0]))
    x, y = torch.randn(5, 4), torch.tensor([0, 0, 1, 2, 1])
    s = el2n(model, x, y, 3)
    assert torch.allclose(s[:2], torch.zeros(2), atol=1e-6)
    assert torch.allclose(s[2:], torch.full((3,), math.sqrt(2)), atol=1e-6)


def test_flipped_labels_dominate_the_top_decile():
    x, y = _digits()
    g = torch.Generator().manual_seed(0)
    flipped = torch.randperm(len(y), generator=g)[: len(y) // 20]
    y = y.clone()
    y[flipped] = (y[flipped] + 1 + torch.randint(0, 9, (len(flipped),), generator=g)) % 10

    def make(gen):
        model = build_model(MLPConfig(hidden=[64]), (64,), 10)
        initialize(model, "kaiming", gen)
        return model

    cfg = El2nConfig(scoring_epochs=2, scoring_seeds=2, batch_size=64)
    scores = el2n_scores(make, x, y, 10, cfg, g)
    top = torch.argsort(scores, descending=True)[: len(y) // 10]
    share = torch.isin(top, flipped).float().mean().item()
    assert share > 0.3, f"flipped examples are {share:.0%} of the top decile (5% of the data)"


def test_keep_highest_with_offset():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3])
    assert keep_highest(scores, 0.4).tolist() == [1, 3]
    assert keep_highest(scores, 0.4, offset=0.2).tolist() == [2, 3]
