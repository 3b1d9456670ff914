import copy
import itertools

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from slimforge.models import CNNConfig, MLPConfig, ViTConfig, build_model
from slimforge.training import FitConfig
from tasks.prune.common import PruneContext
from tasks.prune.lowrank import LowRankConv2d, LowRankLinear, factorable
from tasks.prune.stage import recover
from tasks.prune.welore import (
    WeLoreConfig,
    compression,
    find_threshold,
    kept_rank,
    low_rank_components,
    normalized_spectrum,
    prune_welore,
)
from tasks.train.init import initialize


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _with_spectrum(m: int, n: int, sigma: torch.Tensor, seed: int) -> torch.Tensor:
    """An m x n matrix with singular values ``sigma`` (length min(m, n)) and random singular vectors."""
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=_gen(seed), dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=_gen(seed + 1), dtype=torch.float64))
    k = len(sigma)
    return (u[:, :k] * sigma.double()) @ v[:, :k].T


def _ctx(model, x, y):
    return PruneContext(model, None, tuple(x.shape[1:]), 10, x, y, _gen())


def _mlp(seed=0):
    model = build_model(MLPConfig(hidden=[48, 32]), (64,), 10)
    initialize(model, "kaiming", _gen(seed))
    return model.eval()


def _spectra(model):
    return {name: normalized_spectrum(m.weight) for name, m in factorable(model).items()}


def test_normalization_is_min_max_and_kept_rank_counts_values_at_or_above_threshold():
    w = _with_spectrum(6, 4, torch.tensor([9.0, 5.0, 3.0, 1.0]), seed=1)
    sp = normalized_spectrum(w)
    torch.testing.assert_close(sp.normalized, torch.tensor([1.0, 0.5, 0.25, 0.0], dtype=torch.float64))
    assert (sp.m, sp.n) == (6, 4)
    assert [kept_rank(sp, t) for t in (0.0, 0.24, 0.26, 0.49, 0.51, 1.0)] == [4, 3, 2, 2, 1, 1]
    assert kept_rank(sp, float(sp.normalized[2])) == 3  # a value equal to τ is kept
    flat = normalized_spectrum(torch.eye(5))  # no tail: never cut
    assert kept_rank(flat, 1.0) == 5


def test_fast_decaying_spectrum_gets_a_lower_rank_than_a_flat_one(digits_split):
    model = _mlp()
    with torch.no_grad():  # same 48x64 and 32x48 shapes; layer 1 decays geometrically, layer 3 linearly
        model.backbone[1].weight.copy_(_with_spectrum(48, 64, 0.7 ** torch.arange(48.0), seed=2))
        model.backbone[3].weight.copy_(_with_spectrum(32, 48, torch.linspace(1.0, 0.6, 32), seed=4))
    x, y = digits_split[0][:64], digits_split[1][:64]
    result = prune_welore(_ctx(model, x, y), WeLoreConfig(compression=0.4))
    kept = result.report["welore_threshold_ranks"]
    assert kept["backbone.1"] < kept["backbone.3"], kept
    assert result.ranks == {"backbone.1": kept["backbone.1"]}  # the flat matrix stays a dense N-LRC
    assert isinstance(model.backbone[1], LowRankLinear) and isinstance(model.backbone[3], nn.Linear)


@pytest.mark.parametrize("target", [0.05, 0.2, 0.35, 0.6])
def test_budget_is_met_within_one_rank_step(target):
    model = build_model(CNNConfig(channels=[8, 16], hidden=32), (1, 8, 8), 10)
    initialize(model, "kaiming", _gen(3))
    spectra = _spectra(model)
    tau = find_threshold(spectra, target, 0.5)
    achieved = compression(spectra, low_rank_components(spectra, tau, 0.5))
    assert achieved >= target
    # the next lower candidate keeps exactly one more singular value and misses the budget
    below = max(float(v) for sp in spectra.values() for v in sp.normalized if v < tau)
    assert compression(spectra, low_rank_components(spectra, below, 0.5)) < target
    kept = sum(kept_rank(sp, tau) for sp in spectra.values())
    assert sum(kept_rank(sp, below) for sp in spectra.values()) == kept + 1


def test_bisection_is_monotone_and_agrees_with_a_linear_scan():
    spectra = _spectra(_mlp(seed=5))
    grid = torch.linspace(0, 1, 401).tolist()
    achieved = [compression(spectra, low_rank_components(spectra, t, 0.5)) for t in grid]
    assert all(a <= b for a, b in itertools.pairwise(achieved))
    candidates = sorted({float(v) for sp in spectra.values() for v in sp.normalized})
    for target in (0.1, 0.3, 0.5):
        scan = next(t for t in candidates if compression(spectra, low_rank_components(spectra, t, 0.5)) >= target)
        assert find_threshold(spectra, target, 0.5) == scan


def test_lrc_cutoff_splits_by_rank_reduction():
    sp = normalized_spectrum(_with_spectrum(20, 30, torch.linspace(1, 0, 20), seed=6))  # σ̂ uniform on [0, 1]
    spectra = {"a": sp}
    tau = float(sp.normalized[10])  # keeps 11 of 20: 45% reduction
    assert low_rank_components(spectra, tau, 0.5) == {}
    assert low_rank_components(spectra, tau, 0.45) == {"a": 11}
    tau = float(sp.normalized[9])  # keeps 10 of 20: exactly half
    assert low_rank_components(spectra, tau, 0.5) == {"a": 10}


def test_impossible_budget_names_the_key_and_the_valid_range(digits_split):
    x, y = digits_split[0][:32], digits_split[1][:32]
    with pytest.raises(ValueError, match=r"prune\.compression: 0\.99 cannot be met.*valid range is \(0, 0\.9"):
        prune_welore(_ctx(_mlp(), x, y), WeLoreConfig(compression=0.99))
    with pytest.raises(ValidationError, match="compression"):
        WeLoreConfig(compression=0)


def test_recovery_trains_only_the_lrc_factors(digits_split):
    x, y = digits_split[0][:256], digits_split[1][:256]
    model = _mlp(seed=7)
    cfg = WeLoreConfig(compression=0.3, recovery=FitConfig(epochs=1, batch_size=64, lr=1e-2))
    result = prune_welore(_ctx(model, x, y), cfg)
    lrc = set(result.ranks)
    assert lrc and set(result.trainable) == {f"{n}.{p}.weight" for n in lrc for p in ("down", "up")}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recover(result, cfg, x, y, _gen(8))
    after = model.state_dict()
    for name, value in after.items():
        if name in result.trainable:
            assert not torch.equal(value, before[name]), f"{name} was not fine-tuned"
        else:  # N-LRC weights, every bias (LRC ones too) and the head: bit-identical
            assert torch.equal(value, before[name]), f"{name} moved"


def test_welore_factors_exactly_at_the_chosen_ranks_and_keeps_the_head(digits_split):
    x = digits_split[0][:64].view(-1, 1, 8, 8)
    model = build_model(CNNConfig(channels=[8, 16], hidden=32), (1, 8, 8), 10)
    initialize(model, "kaiming", _gen(9))
    reference = copy.deepcopy(model).eval()
    result = prune_welore(_ctx(model, x, digits_split[1][:64]), WeLoreConfig(compression=0.5))
    assert isinstance(model.head, nn.Linear)
    for name, rank in result.ranks.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, (LowRankLinear, LowRankConv2d)) and layer.down.weight.shape[0] == rank
        dense = reference.get_submodule(name).weight.detach().flatten(1).double()
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        product = layer.up.weight.flatten(1).double() @ layer.down.weight.flatten(1).double()
        torch.testing.assert_close(product, (u[:, :rank] * s[:rank]) @ vh[:rank], atol=1e-5, rtol=1e-5)
    params = {"dense": sum(m.weight.numel() for m in factorable(reference).values()),
              "kept": sum(p.numel() for n, p in model.named_parameters()
                          if n.endswith("weight") and not n.startswith("head."))}
    assert 1 - params["kept"] / params["dense"] == pytest.approx(result.report["welore_compression"], abs=1e-6)
    assert result.report["welore_compression"] >= 0.5


def test_vit_attention_output_projection_stays_dense(digits_split):
    model = build_model(ViTConfig(patch=4, width=16, depth=1, heads=2, mlp=32), (1, 8, 8), 10)
    initialize(model, "kaiming", _gen(10))
    x = digits_split[0][:16].view(-1, 1, 8, 8)
    result = prune_welore(_ctx(model, x, digits_split[1][:16]), WeLoreConfig(compression=0.2))
    assert not any(name.endswith("out_proj") for name in result.ranks)
    assert model(x).shape == (16, 10)
