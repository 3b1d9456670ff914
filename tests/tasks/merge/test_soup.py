import pytest
import torch

from slimforge.models import MLPConfig, build_model
from slimforge.training import FitConfig, accuracy, fit
from tasks.merge.soup import AverageConfig, GreedySoupConfig, average, greedy_soup
from tasks.train.init import initialize


def _copy(state):
    return {k: v.clone() for k, v in state.items()}


def _point(*w):
    """A one-tensor state: a point in the plane."""
    return {"w": torch.tensor(w, dtype=torch.float64)}


def _closeness(target):
    """A validation-like score: higher the nearer the state is to ``target``."""
    return lambda s: -float((s["w"] - torch.tensor(target, dtype=torch.float64)).norm())


def _mlp(seed: int):
    model = build_model(MLPConfig(hidden=[32]), (64,), 10)
    initialize(model, "kaiming", torch.Generator().manual_seed(seed))
    return model


@pytest.fixture(scope="module")
def ingredients(digits_split, one_thread):
    """(four fine-tunes of one base with other seeds and lrs, a held-out scorer) on digits."""
    xtr, ytr, xte, yte = digits_split
    base = _mlp(0)
    fit(base, xtr, ytr, FitConfig(epochs=3, batch_size=64, lr=1e-2), torch.Generator().manual_seed(0))
    states = []
    for seed, lr in [(1, 3e-3), (2, 1e-2), (3, 5e-3), (4, 2e-3)]:
        model = _mlp(0)
        model.load_state_dict(base.state_dict())
        fit(model, xtr, ytr, FitConfig(epochs=2, batch_size=64, lr=lr), torch.Generator().manual_seed(seed))
        states.append(_copy(model.state_dict()))
    probe = _mlp(0)

    def score(state):
        probe.load_state_dict(state)
        return accuracy(probe, xte, yte)

    return states, score


def test_configs_are_strict():
    assert AverageConfig().method == "average" and GreedySoupConfig().method == "greedy_soup"
    with pytest.raises(ValueError):
        GreedySoupConfig(method="greedy_soup", seed=0)


def test_a_soup_of_identical_models_is_that_model(ingredients):
    states, score = ingredients
    copies = [_copy(states[0]) for _ in range(4)]
    soup, kept = greedy_soup(copies, score)
    assert kept == [0, 1, 2, 3]  # a copy never lowers the score, and the paper keeps on >=
    for merged in (average(copies), soup):
        assert all(torch.equal(merged[k], states[0][k]) for k in states[0])  # bit-exact


def test_the_uniform_soup_is_the_mean(ingredients):
    states, _ = ingredients
    soup = average(states)
    for name, value in soup.items():
        torch.testing.assert_close(value, torch.stack([s[name] for s in states]).mean(0), rtol=0, atol=1e-6)


def test_greedy_soup_walks_down_the_ranking_and_keeps_only_what_does_not_hurt():
    # distances to the target: a 0.5, d 0.6, b 0.71, c 3; every soup of a, d, b is nearer than its
    # parts, adding c pulls the soup away
    states = [_point(4.0, 0.0), _point(1.5, 0.0), _point(1.0, -0.6), _point(0.5, 0.5)]  # c, a, d, b
    calls = []
    score = _closeness([1.0, 0.0])

    def counted(s):
        calls.append(s)
        return score(s)

    soup, kept = greedy_soup(states, counted)
    assert kept == [1, 2, 3]  # a (best), then d, then b; c (index 0) is left out
    torch.testing.assert_close(soup["w"], (states[1]["w"] + states[2]["w"] + states[3]["w"]) / 3)
    assert len(calls) == 2 * len(states) - 1
    assert score(soup) >= max(score(s) for s in states)


def test_an_ingredient_that_does_not_change_the_score_is_kept():
    score = lambda s: float(s["w"][0] > 0)  # accuracy-like: ties are common
    soup, kept = greedy_soup([_point(1.0, 0.0), _point(2.0, 5.0), _point(-9.0, 0.0)], score)
    assert kept == [0, 1]  # ties keep input order; 2 would flip the sign and is left out
    torch.testing.assert_close(soup["w"], torch.tensor([1.5, 2.5], dtype=torch.float64))


def test_the_order_of_the_ingredients_does_not_change_the_soup(ingredients):
    states, score = ingredients
    soup, kept = greedy_soup(states, score)
    perm = [2, 0, 3, 1]
    soup_p, kept_p = greedy_soup([states[i] for i in perm], score)
    if len({score(s) for s in states}) == len(states):  # distinct ranks: the same soup bit for bit
        assert [perm[i] for i in kept_p] == kept
        assert all(torch.equal(soup_p[k], soup[k]) for k in soup)
    assert score(soup_p) == score(soup)
    points = [_point(4.0, 0.0), _point(1.5, 0.0), _point(1.0, -0.6), _point(0.5, 0.5)]
    a, ka = greedy_soup(points, _closeness([1.0, 0.0]))
    b, kb = greedy_soup(points[::-1], _closeness([1.0, 0.0]))
    assert torch.equal(a["w"], b["w"]) and [3 - i for i in kb] == ka


def test_greedy_soup_beats_its_best_ingredient_and_leaves_out_a_harmful_one(ingredients, digits_split):
    states, score = ingredients
    xtr, ytr, _, _ = digits_split
    stranger = _mlp(7)  # trained from another init: good alone, not linearly connected to the rest
    fit(stranger, xtr, ytr, FitConfig(epochs=2, batch_size=64, lr=1e-2), torch.Generator().manual_seed(7))
    pool = [*states, _copy(stranger.state_dict())]
    soup, kept = greedy_soup(pool, score)
    own = [score(s) for s in pool]
    assert own[-1] > 0.8  # the stranger is a good model on its own
    assert score(average([states[kept[0]], pool[-1]])) < own[-1]  # ... that hurts any soup
    assert len(pool) - 1 not in kept
    assert score(soup) >= max(own)
    assert kept[0] == max(range(len(pool)), key=lambda i: (own[i], -i))
