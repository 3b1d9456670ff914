from itertools import combinations, pairwise

import pytest
import torch

from slimforge.models import MLPConfig, build_model
from slimforge.training import FitConfig, accuracy, fit
from tasks.prune.common import PruneContext
from tasks.prune.magnitude import magnitude_masks, prunable
from tasks.prune.soup import (
    SparseSoupConfig,
    average_sparse,
    ingredient_seeds,
    phase_sparsities,
    prune_sparse_soup,
    soup_retrainer,
    sparse_model_soup,
)
from tasks.train.init import initialize

QUICK = FitConfig(epochs=1, batch_size=100, lr=1e-2)


def _mlp(seed: int, hidden=(32,)):
    model = build_model(MLPConfig(hidden=list(hidden)), (64,), 10)
    initialize(model, "kaiming", torch.Generator().manual_seed(seed))
    return model


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _masked_states(masks, n: int, seed: int):
    """n random MLP states, each zero where ``masks`` is False."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        state = {k: torch.randn(v.shape, generator=g) for k, v in _state(_mlp(0)).items()}
        for name, m in masks.items():
            state[name] *= m
        out.append(state)
    return out


def _masks(seed: int = 0, sparsity: float = 0.7):
    return magnitude_masks(prunable(_mlp(seed)), sparsity, "global")


def test_a_soup_of_identical_ingredients_is_that_model():
    masks = _masks()
    (state,) = _masked_states(masks, 1, seed=1)
    soup = average_sparse([{k: v.clone() for k, v in state.items()} for _ in range(3)], [masks] * 3)
    assert all(torch.equal(soup[k], state[k]) for k in state)  # bit-exact, not only close


def test_a_sparse_soup_is_the_mean_with_exactly_the_shared_mask():
    masks = _masks()
    states = _masked_states(masks, 3, seed=2)
    states[1]["head.weight"][~masks["head.weight"]] = 5.0  # an ingredient that broke its mask
    soup = average_sparse(states, [masks] * 3)
    for name, value in soup.items():
        mean = torch.stack([s[name] for s in states]).mean(0)
        if name in masks:
            assert (value[~masks[name]] == 0).all()
            torch.testing.assert_close(value[masks[name]], mean[masks[name]], rtol=0, atol=1e-6)
        else:
            torch.testing.assert_close(value, mean, rtol=0, atol=1e-6)
    n = sum(m.numel() for m in masks.values())
    zeros = sum(int((soup[k] == 0).sum()) for k in masks)
    assert zeros == n - sum(int(m.sum()) for m in masks.values())  # sparsity exactly the mask's


def test_differing_masks_are_refused():
    masks = _masks()
    other = {k: v.clone() for k, v in masks.items()}
    other["backbone.1.weight"][0, 0] = ~other["backbone.1.weight"][0, 0]
    states = _masked_states(masks, 2, seed=3)
    with pytest.raises(ValueError, match="mask differs.*'backbone.1.weight'"):
        average_sparse(states, [masks, other])
    with pytest.raises(ValueError, match="masks"):
        average_sparse(states, [masks, {k: v for k, v in masks.items() if k != "head.weight"}])


def test_ingredients_of_differing_layout_are_refused_naming_the_tensor():
    masks = _masks()
    states = _masked_states(masks, 2, seed=4)
    states[1]["head.bias"] = torch.zeros(11)
    with pytest.raises(ValueError, match="'head.bias'"):
        average_sparse(states, [masks] * 2)


def test_config_checks_the_weight_decays():
    assert SparseSoupConfig(vary="weight_decay", ingredients=2, weight_decays=[0.0, 1e-3]).weight_decays == [0.0, 1e-3]
    with pytest.raises(ValueError, match="prune.weight_decays"):
        SparseSoupConfig(vary="weight_decay", ingredients=3, weight_decays=[0.0, 1e-3])
    with pytest.raises(ValueError, match="prune.weight_decays"):
        SparseSoupConfig(vary="weight_decay")
    with pytest.raises(ValueError, match="prune.weight_decays"):
        SparseSoupConfig(weight_decays=[0.0, 1e-3, 1e-2])


def test_phases_follow_the_formula_start_every_ingredient_alike_and_end_at_the_mean():
    """Stub retraining perturbs the weights (masks held) so each ingredient differs."""
    model = _mlp(1, hidden=(24, 16))
    n = sum(w.numel() for w in prunable(model).values())
    g = torch.Generator().manual_seed(3)
    cfg = SparseSoupConfig(sparsity=0.75, rounds=3, ingredients=3)
    calls = []

    def retrain(m, masks, phase, i):
        start = _state(m)
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.add_(torch.randn(p.shape, generator=g))
                if name in masks:
                    p.mul_(masks[name])
        calls.append((phase, i, {k: v.clone() for k, v in masks.items()}, start, _state(m)))

    result = sparse_model_soup(model, retrain, cfg)
    assert [(c[0], c[1]) for c in calls] == [(r, i) for r in (1, 2, 3) for i in range(3)]
    for r, target in enumerate(phase_sparsities(cfg), start=1):
        assert target == pytest.approx(1 - 0.25 ** (r / 3), abs=1e-12)
        phase = [c for c in calls if c[0] == r]
        masks = phase[0][2]
        assert sum(int(m.sum()) for m in masks.values()) == round((1 - target) * n)
        assert result.history[r - 1]["sparsity"] == 1 - round((1 - target) * n) / n
        for _, _, m, start, _ in phase[1:]:
            assert all(torch.equal(m[k], masks[k]) for k in masks)
            assert all(torch.equal(start[k], phase[0][3][k]) for k in start)  # the same pruned model
    for (_, _, prev, _, _), (_, _, cur, _, _) in pairwise(calls[::3]):
        assert all(not (cur[k] & ~prev[k]).any() for k in cur)  # nested
    final = _state(model)
    for name, value in final.items():
        torch.testing.assert_close(value, torch.stack([c[4][name] for c in calls[-3:]]).mean(0), rtol=0, atol=1e-6)
    assert result.history[-1]["sparsity"] == 1 - round(0.25 * n) / n


@pytest.mark.parametrize("vary", ["seed", "weight_decay"])
def test_ingredients_really_differ_and_the_soup_keeps_their_mask(digits_split, vary):
    xtr, ytr, _, _ = digits_split
    cfg = SparseSoupConfig(sparsity=0.6, rounds=1, ingredients=3, vary=vary, training=QUICK,
                           weight_decays=[0.0, 0.3, 1.0] if vary == "weight_decay" else None)
    seeds = ingredient_seeds(cfg)
    assert len(set(seeds[0])) == (3 if vary == "seed" else 1)
    model = _mlp(0)
    fit(model, xtr, ytr, QUICK, torch.Generator().manual_seed(0))
    retrain, ingredients = soup_retrainer(xtr, ytr, cfg), []

    def record(m, masks, phase, i):
        retrain(m, masks, phase, i)
        ingredients.append(_state(m))

    result = sparse_model_soup(model, record, cfg)
    for a, b in combinations(ingredients, 2):
        assert not torch.equal(a["backbone.1.weight"], b["backbone.1.weight"])
    for name, w in prunable(model).items():
        assert (w[~result.masks[name]] == 0).all()
        assert (w[result.masks[name]] != 0).all()


def test_registry_entry_reports_every_ingredient_and_soup_on_held_out_data(digits_split):
    xtr, ytr, xte, yte = digits_split
    model = _mlp(0)
    fit(model, xtr, ytr, QUICK, torch.Generator().manual_seed(0))
    ctx = PruneContext(model, MLPConfig(hidden=[32]), (64,), 10, xtr, ytr, torch.Generator(), val=(xte, yte))
    out = prune_sparse_soup(ctx, SparseSoupConfig(sparsity=0.5, rounds=2, ingredients=2, training=QUICK))
    n = sum(m.numel() for m in out.masks.values())
    assert sum(int(m.sum()) for m in out.masks.values()) == round(0.5 * n)
    rounds = out.report["soup_rounds"]
    assert list(rounds) == ["1", "2"] and out.report["soup_ingredients"] == 2
    assert all(len(row["ingredient_val_accuracy"]) == 2 for row in rounds.values())
    assert rounds["2"]["soup_val_accuracy"] == round(accuracy(out.model, xte, yte), 6)
    assert rounds["2"]["sparsity"] == pytest.approx(0.5, abs=1e-4)
