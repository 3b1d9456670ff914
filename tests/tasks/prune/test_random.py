import pytest
import torch
from pydantic import ValidationError
from torch import nn

from slimforge.models import MLPConfig, build_model
from tasks.prune.common import PruneContext
from tasks.prune.magnitude import magnitude_masks, prunable
from tasks.prune.random import RandomConfig, prune_random, random_like, random_masks


def _weights():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(36, 25), nn.ReLU(), nn.Linear(25, 7))
    return {n: w.detach() for n, w in prunable(model).items()}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("sparsity", [0.0, 0.37, 0.8, 0.99])
def test_exact_sparsity_global_and_layer(sparsity):
    weights = _weights()
    total = sum(w.numel() for w in weights.values())
    masks = random_masks(weights, sparsity, "global", _gen(0))
    assert sum(int(m.sum()) for m in masks.values()) == round((1 - sparsity) * total)
    masks = random_masks(weights, sparsity, "layer", _gen(0))
    for name, m in masks.items():
        assert m.shape == weights[name].shape and m.dtype == torch.bool
        assert int(m.sum()) == round((1 - sparsity) * m.numel()), name


def test_counts_match_magnitude_so_only_the_choice_differs():
    weights = _weights()
    for scope in ("global", "layer"):
        rand = random_masks(weights, 0.65, scope, _gen(1))
        mag = magnitude_masks(weights, 0.65, scope)
        assert sum(int(m.sum()) for m in rand.values()) == sum(int(m.sum()) for m in mag.values())


def test_same_seed_identical_different_seed_different():
    weights = _weights()
    for scope in ("global", "layer"):
        a = random_masks(weights, 0.5, scope, _gen(3))
        b = random_masks(weights, 0.5, scope, _gen(3))
        c = random_masks(weights, 0.5, scope, _gen(4))
        assert all(torch.equal(a[n], b[n]) for n in a)
        assert any(not torch.equal(a[n], c[n]) for n in a)


def test_random_like_keeps_per_layer_counts_but_moves_the_weights():
    weights = _weights()
    # magnitude under global scope gives uneven per-layer counts: a real reference to copy
    with torch.no_grad():
        weights["2.weight"] = weights["2.weight"] * 10
    ref = magnitude_masks(weights, 0.7, "global")
    counts = {n: int(m.sum()) for n, m in ref.items()}
    assert len({c / ref[n].numel() for n, c in counts.items()}) > 1
    like = random_like(ref, _gen(0))
    assert {n: int(m.sum()) for n, m in like.items()} == counts
    assert all(like[n].shape == ref[n].shape for n in ref)
    assert not all(torch.equal(like[n], ref[n]) for n in ref)
    again = random_like(ref, _gen(0))
    assert all(torch.equal(like[n], again[n]) for n in ref)


def test_positions_are_uniform_over_draws():
    # 3000 draws of a 4x6 layer at 75% sparsity: each position kept with p = 0.25.
    # A biased sampler (e.g. always the first k, or randperm without the generator reused)
    # would put some position far outside 5 sigma (sigma = sqrt(p(1-p)/draws) = 0.0079).
    w = {"w": torch.zeros(4, 6), "v": torch.zeros(10)}
    g = _gen(0)
    draws = 3000
    freq = {"w": torch.zeros(4, 6), "v": torch.zeros(10)}
    for _ in range(draws):
        for n, m in random_masks(w, 0.75, "global", g).items():
            freq[n] += m
    p = round(0.25 * 34) / 34
    sigma = (p * (1 - p) / draws) ** 0.5
    for n, f in freq.items():
        dev = (f / draws - p).abs().max().item()
        assert dev < 5 * sigma, f"{n}: max deviation {dev:.4f} from p={p:.4f}"
    like = torch.zeros(4, 6)
    ref = {"w": torch.arange(24).view(4, 6) < 6}
    for _ in range(draws):
        like += random_like(ref, g)["w"]
    assert (like / draws - 0.25).abs().max().item() < 5 * (0.25 * 0.75 / draws) ** 0.5


def test_config_rejects_bad_values():
    assert RandomConfig().method == "random"
    with pytest.raises(ValidationError):
        RandomConfig(sparsity=1.0)
    with pytest.raises(ValidationError):
        RandomConfig(scope="block")
    with pytest.raises(ValidationError):
        RandomConfig(seeds=1)


def test_registry_entry_prunes_the_model_reproducibly():
    def run(seed):
        arch = MLPConfig(hidden=[16])
        x = torch.rand(20, 12, generator=_gen(0))
        ctx = PruneContext(model=build_model(arch, (12,), 3), model_config=arch, input_shape=(12,), num_classes=3,
                           x=x, y=torch.zeros(20, dtype=torch.long), generator=_gen(99))
        return prune_random(ctx, RandomConfig(sparsity=0.6, scope="layer", seed=seed))

    a, b, c = run(1), run(1), run(2)
    for name, w in prunable(a.model).items():
        assert torch.all(w[~a.masks[name]] == 0), name
        assert int(a.masks[name].sum()) == round(0.4 * w.numel())
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert any(not torch.equal(a.masks[n], c.masks[n]) for n in a.masks)
