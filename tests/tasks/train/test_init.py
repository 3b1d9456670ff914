import math

import pytest
import torch
from torch import nn

from slimforge.models import CNNConfig, MLPConfig, ViTConfig, build_model, weight_params
from tasks.train.init import DRAWS, INITS, initialize, kaiming, orthogonal, xavier
from tasks.train.init_config import INIT_SCHEMES, ErkConfig, XavierConfig

ARCHS = [(MLPConfig(), (1, 28, 28)), (CNNConfig(), (1, 28, 28)), (ViTConfig(), (1, 28, 28)),
         (CNNConfig(), (40,)), (ViTConfig(patch=4), (40,))]
DRAWN = [s for s in INIT_SCHEMES if s not in ("rewind", "pretrained")]  # file-free schemes


def _init(cfg, shape, scheme, seed):
    model = build_model(cfg, shape, 10)
    masks = initialize(model, scheme, torch.Generator().manual_seed(seed))
    return model, masks


def test_kaiming_and_xavier_std():
    w = torch.empty(512, 512)
    g = torch.Generator().manual_seed(0)
    assert abs(kaiming(w, g).std().item() / math.sqrt(2 / 512) - 1) < 0.03
    assert abs(xavier(w, g).std().item() / math.sqrt(2 / 1024) - 1) < 0.03


def test_orthogonal_singular_values_equal_gain():
    w = orthogonal(torch.empty(64, 128), torch.Generator().manual_seed(0), gain=1.5)
    s = torch.linalg.svdvals(w.double())
    assert torch.allclose(s, torch.full_like(s, 1.5), atol=1e-5)


def test_orthogonal_default_gain_is_sqrt2_for_kernels():
    w = orthogonal(torch.empty(32, 4, 3, 3), torch.Generator().manual_seed(0))  # as (32, 36)
    s = torch.linalg.svdvals(w.double().reshape(32, 36))
    assert torch.allclose(s, torch.full_like(s, math.sqrt(2)), atol=1e-5)


def test_kaiming_keeps_activation_variance_through_depth():
    g = torch.Generator().manual_seed(0)
    model = build_model(MLPConfig(hidden=[256] * 10), (256,), 10)
    assert initialize(model, "kaiming", g) == {}
    x = torch.randn(2048, 256, generator=g)
    variances = []
    for layer in model.backbone:
        x = layer(x)
        if isinstance(layer, nn.ReLU):
            variances.append(x.pow(2).mean().item())
    assert max(variances) / min(variances) < 2.0


@pytest.mark.parametrize("scheme", DRAWN)
@pytest.mark.parametrize("cfg,shape", ARCHS)
def test_same_seed_same_weights_for_every_scheme_and_architecture(scheme, cfg, shape):
    a, masks_a = _init(cfg, shape, scheme, 3)
    b, masks_b = _init(cfg, shape, scheme, 3)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    assert masks_a.keys() == masks_b.keys()
    assert all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)
    assert a(torch.zeros(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("scheme", DRAWN)
def test_other_seed_other_weights(scheme):
    a, _ = _init(MLPConfig(hidden=[32]), (1, 8, 8), scheme, 0)
    b, _ = _init(MLPConfig(hidden=[32]), (1, 8, 8), scheme, 1)
    assert not torch.equal(a.head.weight, b.head.weight)


@pytest.mark.parametrize("scheme", DRAWN)
def test_biases_zero_norms_identity_position_embedding_small(scheme):
    model, _ = _init(ViTConfig(width=64, depth=2), (1, 28, 28), scheme, 0)
    for name, p in model.named_parameters():
        if name.endswith("bias") and "norm" not in name:
            assert torch.count_nonzero(p) == 0, name
        if "norm" in name:
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
    pos = model.backbone.pos
    assert abs(pos.std().item() / 0.02 - 1) < 0.15
    assert all(p.abs().sum() > 0 for p in weight_params(model).values())


def test_weight_params_cover_linear_conv_and_attention():
    names = set(weight_params(build_model(ViTConfig(depth=1), (1, 28, 28), 10)))
    assert names == {"backbone.embed.weight", "backbone.blocks.0.attn.in_proj_weight",
                     "backbone.blocks.0.attn.out_proj.weight", "backbone.blocks.0.mlp.0.weight",
                     "backbone.blocks.0.mlp.2.weight", "head.weight"}


def test_string_dict_and_config_forms_are_the_same_init():
    draws = []
    for form in ("xavier", {"scheme": "xavier"}, XavierConfig()):
        model = nn.Linear(16, 8)
        initialize(model, form, torch.Generator().manual_seed(5))
        draws.append(model.weight.clone())
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])
    ref = xavier(torch.empty(8, 16), torch.Generator().manual_seed(5))
    assert torch.equal(draws[0], ref)


def test_only_erk_returns_masks():
    for scheme in DRAWN:
        model = build_model(MLPConfig(hidden=[32]), (1, 8, 8), 10)
        masks = initialize(model, scheme, torch.Generator().manual_seed(0))
        assert (masks != {}) == (scheme == "erk"), scheme
    model = build_model(MLPConfig(hidden=[32]), (1, 8, 8), 10)
    masks = initialize(model, ErkConfig(density=0.3), torch.Generator().manual_seed(0))
    assert set(masks) == set(weight_params(model))


def test_registry_covers_every_config_scheme():
    assert set(INITS) == set(INIT_SCHEMES)
    assert set(DRAWS) <= set(INITS)


def test_unknown_init_lists_valid_names():
    with pytest.raises(ValueError, match="kaiming, xavier, orthogonal"):
        initialize(nn.Linear(2, 2), "kaimig", torch.Generator())
