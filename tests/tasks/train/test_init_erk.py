import math

import pytest
import torch

from slimforge.models import CNNConfig, MLPConfig, ViTConfig, build_model, weight_params
from slimforge.training import FitConfig, MaskHold, fit
from tasks.train.init import initialize
from tasks.train.init_config import ErkConfig
from tasks.train.inits.erk import erk_densities, erk_masks, erk_raw

MODELS = {"mlp": (MLPConfig(), (1, 28, 28)), "cnn": (CNNConfig(), (1, 28, 28)),
          "vit": (ViTConfig(), (1, 28, 28))}


def _shapes(arch):
    cfg, shape = MODELS[arch]
    return {k: tuple(p.shape) for k, p in weight_params(build_model(cfg, shape, 10)).items()}


def test_raw_density_formula():
    assert erk_raw((32, 16, 3, 3)) == pytest.approx((16 + 32 + 3 + 3) / (16 * 32 * 3 * 3))
    assert erk_raw((10, 256)) == pytest.approx((256 + 10) / (256 * 10))  # no kernel terms


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.9])
def test_densities_meet_the_budget_and_never_exceed_one(arch, density):
    shapes = _shapes(arch)
    d = erk_densities(shapes, density)
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    assert all(0 < v <= 1.0 for v in d.values())
    assert sum(d[k] * sizes[k] for k in shapes) == pytest.approx(density * sum(sizes.values()), rel=1e-9)
    masks = erk_masks(shapes, density, torch.Generator().manual_seed(0))
    kept = sum(int(m.sum()) for m in masks.values())
    assert abs(kept - density * sum(sizes.values())) <= len(shapes)


@pytest.mark.parametrize("arch", MODELS)
def test_uncapped_ratios_follow_the_formula_and_capped_layers_are_dense(arch):
    shapes = _shapes(arch)
    d = erk_densities(shapes, 0.5)
    capped = [k for k, v in d.items() if v == 1.0]
    free = [k for k, v in d.items() if v < 1.0]
    assert capped and free  # at D = 0.5 the small layers (the head) saturate
    eps = d[free[0]] / erk_raw(shapes[free[0]])
    for k in free:
        assert d[k] == pytest.approx(eps * erk_raw(shapes[k]), rel=1e-12), k
    for k in capped:
        assert eps * erk_raw(shapes[k]) > 1.0, k  # capped only because the formula exceeded 1


def test_full_density_is_dense():
    d = erk_densities(_shapes("cnn"), 1.0)
    assert all(v == 1.0 for v in d.values())


def test_mask_counts_are_exact():
    shapes = _shapes("mlp")
    d = erk_densities(shapes, 0.1)
    masks = erk_masks(shapes, 0.1, torch.Generator().manual_seed(3))
    for k, m in masks.items():
        assert m.dtype == torch.bool and m.shape == shapes[k]
        assert int(m.sum()) == round(d[k] * math.prod(shapes[k])), k


@pytest.mark.parametrize("arch", MODELS)
def test_masks_zero_exactly_the_masked_weights_of_the_dense_draw(arch):
    cfg, shape = MODELS[arch]
    dense, sparse = build_model(cfg, shape, 10), build_model(cfg, shape, 10)
    initialize(dense, "kaiming", torch.Generator().manual_seed(7))
    masks = initialize(sparse, ErkConfig(density=0.2), torch.Generator().manual_seed(7))
    weights, ref = weight_params(sparse), weight_params(dense)
    assert set(masks) == set(weights)
    for k, m in masks.items():
        assert torch.equal(weights[k][m], ref[k][m]), k  # kept: the base draw, bit-exactly
        assert torch.all(weights[k][~m] == 0) and not torch.signbit(weights[k][~m]).any(), k
        assert torch.count_nonzero(weights[k]) == int(m.sum()), k
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert abs(kept - 0.2 * total) <= len(masks)


def test_masks_follow_the_generator():
    shapes = _shapes("cnn")
    a = erk_masks(shapes, 0.3, torch.Generator().manual_seed(1))
    b = erk_masks(shapes, 0.3, torch.Generator().manual_seed(1))
    c = erk_masks(shapes, 0.3, torch.Generator().manual_seed(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_a_mask_hold_keeps_pruned_weights_at_zero_through_training():
    g = torch.Generator().manual_seed(0)
    model = build_model(MLPConfig(hidden=[32]), (1, 8, 8), 10)
    masks = initialize(model, ErkConfig(density=0.3), g)
    x, y = torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    fit(model, x, y, FitConfig(epochs=2, batch_size=16), g, hold=MaskHold(model, masks), label="t")
    weights = weight_params(model)
    for k, m in masks.items():
        assert torch.all(weights[k][~m] == 0), k
        assert torch.count_nonzero(weights[k][m]) == int(m.sum()), k  # the kept ones did train
