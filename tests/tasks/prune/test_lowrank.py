import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from slimforge.models import CNNConfig, MLPConfig, build_model
from tasks.prune.lowrank import (
    LowRankConv2d,
    LowRankLinear,
    SvdConfig,
    energy_rank,
    factorize,
    factorize_with_ranks,
    svd_factors,
)
from tasks.train.init import initialize


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def digits():
    return torch.tensor(load_digits().data[:200], dtype=torch.float32) / 16  # (200, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rank", [1, 5, 17, 29])
def test_eckart_young_residual_and_balanced_factors(dtype, rank):
    w = torch.randn(40, 30, generator=_gen(), dtype=torch.float64).to(dtype)
    s = torch.linalg.svdvals(w.double())
    a, b = svd_factors(w, rank)
    assert a.shape == (rank, 30) and b.shape == (40, rank) and a.dtype == dtype
    residual = ((w.double() - b.double() @ a.double()) ** 2).sum()
    tail = (s[rank:] ** 2).sum()
    assert torch.isclose(residual, tail, rtol=1e-5), f"‖W−W_r‖²={residual.item()} vs Σσ²_tail={tail.item()}"
    # Σ^{1/2} on each side: BᵀB = AAᵀ = Σ_r (the split is balanced, not U_rΣ_r and V_rᵀ)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose((b.T @ b).double(), torch.diag(s[:rank]), atol=tol * s[0])
    assert torch.allclose((a @ a.T).double(), torch.diag(s[:rank]), atol=tol * s[0])


def test_svd_factors_rejects_bad_rank():
    with pytest.raises(ValueError, match="outside 1..3"):
        svd_factors(torch.ones(3, 5), 4)


def test_energy_rank_is_the_smallest_rank_reaching_e():
    s = torch.tensor([3.0, 2.0, 1.0])  # σ² = 9, 4, 1; total 14
    assert energy_rank(s, 9 / 14) == 1  # exactly reached
    assert energy_rank(s, 9 / 14 + 1e-6) == 2
    assert energy_rank(s, 13 / 14) == 2
    assert energy_rank(s, 0.99) == 3
    assert energy_rank(s, 1.0) == 3
    assert energy_rank(torch.zeros(4), 0.5) == 1


def test_full_rank_reproduces_linear_and_conv():
    lin = nn.Linear(12, 7)
    conv_same = nn.Conv2d(3, 5, 3, padding="same")
    conv_strided = nn.Conv2d(4, 6, (3, 2), stride=2, padding=1)
    x = torch.randn(8, 12, generator=_gen(1))
    img3, img4 = torch.randn(2, 3, 9, 9, generator=_gen(2)), torch.randn(2, 4, 9, 10, generator=_gen(3))
    full = LowRankLinear.from_dense(lin, 7)
    torch.testing.assert_close(full(x), lin(x), atol=1e-5, rtol=1e-5)
    for conv, img in [(conv_same, img3), (conv_strided, img4)]:
        m, n = conv.weight.shape[0], conv.weight[0].numel()
        low = LowRankConv2d.from_dense(conv, min(m, n))
        assert low.down.weight.shape[0] == min(m, n) and low.up.weight.shape[2:] == (1, 1)
        torch.testing.assert_close(low(img), conv(img), atol=1e-5, rtol=1e-5)


def test_truncated_conv_equals_conv_with_rank_r_kernel():
    conv = nn.Conv2d(4, 8, 3, padding=1)
    a, b = svd_factors(conv.weight.flatten(1), 3)
    ref = nn.Conv2d(4, 8, 3, padding=1)
    with torch.no_grad():
        ref.weight.copy_((b @ a).view_as(conv.weight))
        ref.bias.copy_(conv.bias)
    img = torch.randn(2, 4, 6, 6, generator=_gen(4))
    torch.testing.assert_close(LowRankConv2d.from_dense(conv, 3)(img), ref(img), atol=1e-5, rtol=1e-5)


def _mixed_mlp():
    """An MLP whose first hidden layer is exactly rank 2 and whose second is full rank."""
    model = build_model(MLPConfig(hidden=[48, 32]), (64,), 10)
    initialize(model, "kaiming", _gen(5))
    with torch.no_grad():
        w = model.backbone[1].weight  # (48, 64)
        w.copy_(torch.randn(48, 2, generator=_gen(6)) @ torch.randn(2, 64, generator=_gen(7)))
    return model.eval()


def test_factorize_params_drop_exactly_and_unprofitable_layers_stay_dense(digits):
    model = _mixed_mlp()
    before, logits = _n_params(model), model(digits)
    ranks = factorize(model, SvdConfig(energy=0.999))
    # layer 1 is rank 2 (2·(48+64) < 48·64); a random 32x48 needs r ≈ 30 > 32·48/80 = 19.2
    assert ranks == {"backbone.1": 2}
    assert isinstance(model.backbone[1], LowRankLinear)
    assert isinstance(model.backbone[3], nn.Linear) and isinstance(model.head, nn.Linear)
    assert before - _n_params(model) == 48 * 64 - 2 * (48 + 64)
    torch.testing.assert_close(model(digits), logits, atol=1e-4, rtol=1e-4)  # rank 2 was exact


def test_factorize_energy_one_or_full_ratio_changes_nothing():
    for cfg in [SvdConfig(energy=1.0), SvdConfig(ratio=1.0)]:
        model = _mixed_mlp()
        model.backbone[1].weight.data = torch.randn(48, 64, generator=_gen(8))  # full rank again
        before = _n_params(model)
        assert factorize(model, cfg) == {}
        assert _n_params(model) == before


def test_factorize_cnn_ratio_rule_and_head_stays_dense(digits):
    model = build_model(CNNConfig(channels=[8, 16], hidden=32), (1, 8, 8), 10)
    initialize(model, "kaiming", _gen(9))
    before = _n_params(model)
    ranks = factorize(model, SvdConfig(ratio=0.25))
    # conv1 (8, 9): r=2 pays (2·17 < 72); conv2 (16, 72): r=4; fc (32, 64): r=8
    assert ranks == {"backbone.body.0": 2, "backbone.body.3": 4, "backbone.body.7": 8}
    saved = (8 * 9 - 2 * 17) + (16 * 72 - 4 * 88) + (32 * 64 - 8 * 96)
    assert before - _n_params(model) == saved
    assert isinstance(model.backbone.body[0], LowRankConv2d) and isinstance(model.head, nn.Linear)
    assert model(digits.view(-1, 1, 8, 8)).shape == (200, 10)


def test_factorize_with_ranks_rebuilds_the_same_tree(digits):
    model = _mixed_mlp()
    ranks = factorize(model, SvdConfig(energy=0.999))
    fresh = build_model(MLPConfig(hidden=[48, 32]), (64,), 10)
    factorize_with_ranks(fresh, ranks)
    want = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in fresh.state_dict().items()} == want
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(digits), model(digits))


def test_factorize_with_ranks_names_unknown_layers():
    model = build_model(MLPConfig(hidden=[8]), (4,), 3)
    with pytest.raises(ValueError, match="'head' is not a factorable layer.*backbone.1"):
        factorize_with_ranks(model, {"head": 1})
