import pytest
import torch
from torch import nn

from slimforge.models import MLPConfig, build_model
from tasks.finetune.eva import collect_inputs, eva_init, principal_directions, redistribute_ranks
from tasks.finetune.lora import LoRALinear, add_adapters


def _anisotropic(n, d, scales, seed):
    """(n, d) rows with per-direction scales along a random rotation."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    return (torch.randn(n, d, generator=g) * torch.as_tensor(scales)) @ Q.T


def _model(seed=0):
    model = build_model(MLPConfig(hidden=[24, 16]), (1, 4, 5), 3)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _batches(n_batches=3, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 1, 4, 5, generator=g) for _ in range(n_batches)]


def test_rows_are_orthonormal_and_capture_the_top_eigenvalues_of_xtx():
    X = _anisotropic(300, 16, torch.linspace(3.0, 0.2, 16), seed=0)
    r = 4
    V, ratios = principal_directions(X, r)
    torch.testing.assert_close(V @ V.T, torch.eye(r), atol=1e-5, rtol=0)
    eig = torch.linalg.eigvalsh(X.double().T @ X.double()).flip(0)  # descending
    captured = (X.double() @ V.double().T).square().sum()  # ‖X Vᵀ‖²_F = tr(V XᵀX Vᵀ)
    torch.testing.assert_close(captured, eig[:r].sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(ratios, eig[:r] / eig.sum(), rtol=1e-5, atol=0)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        Q, _ = torch.linalg.qr(torch.randn(16, r, generator=g, dtype=torch.float64))  # (d, r)
        assert (X.double() @ Q).square().sum() <= captured * (1 + 1e-9)


def test_centered_directions_are_the_principal_components():
    X = _anisotropic(200, 8, torch.linspace(2.0, 0.5, 8), seed=1) + 5.0  # a large mean
    V, ratios = principal_directions(X, 2, center=True)
    Xc = (X - X.mean(0)).double()
    eig = torch.linalg.eigvalsh(Xc.T @ Xc).flip(0)
    torch.testing.assert_close((Xc @ V.double().T).square().sum(), eig[:2].sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(ratios, eig[:2] / eig.sum(), rtol=1e-5, atol=0)


def test_collect_inputs_flattens_leading_dims():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    seen = collect_inputs(model, ["0", "2"], [x, x[:1]])
    assert seen["0"].shape == (9, 5) and seen["2"].shape == (9, 4)
    torch.testing.assert_close(seen["0"][:6], x.reshape(6, 5))
    torch.testing.assert_close(seen["2"][:6], torch.relu(model[0](x)).reshape(6, 4))


def test_ranks_go_to_the_layer_with_spread_out_variance():
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=g)
    concentrated = torch.randn(256, 1, generator=g) * direction + 1e-3 * torch.randn(256, 16, generator=g)
    spread = torch.randn(256, 16, generator=g)
    r, rho = 4, 2.0
    ratios = {n: principal_directions(X, round(r * rho))[1]
              for n, X in (("concentrated", concentrated), ("spread", spread))}
    ranks = redistribute_ranks(ratios, r * 2)
    assert sum(ranks.values()) == r * 2
    assert ranks == {"concentrated": 1, "spread": 7}


def test_ranks_sum_to_the_budget_and_respect_the_cap():
    ratios = {"a": torch.tensor([0.9, 0.05, 0.03]), "b": torch.tensor([0.5, 0.4, 0.1]),
              "c": torch.tensor([0.2, 0.2, 0.2])}
    assert redistribute_ranks(ratios, 4) == {"a": 1, "b": 2, "c": 1}
    assert redistribute_ranks(ratios, 100) == {"a": 3, "b": 3, "c": 3}  # all there is
    model = _model()
    for rho, cap in ((1.0, 2), (1.5, 3), (2.0, 4), (10.0, 16)):
        ranks, init_A = eva_init(model, ["backbone.*"], _batches(), rank=2, rho=rho)
        assert sum(ranks.values()) == 2 * 2
        assert all(0 <= r <= cap for r in ranks.values()), ranks
        if rho == 1.0:
            assert ranks == {"backbone.1": 2, "backbone.3": 2}
        assert {n: a.shape[0] for n, a in init_A.items()} == {n: r for n, r in ranks.items() if r}


def test_cap_is_at_most_the_number_of_inputs_and_features():
    V, ratios = principal_directions(torch.randn(3, 10, generator=torch.Generator()), 8)
    assert V.shape == (3, 10) and ratios.shape == (3,)
    V, _ = principal_directions(torch.randn(50, 2, generator=torch.Generator()), 8)
    assert V.shape == (2, 2)


def test_eva_adapters_start_at_the_base_and_have_orthonormal_rows():
    base, model = _model(), _model()
    x = _batches(1, 16, seed=5)[0]
    ranks, init_A = eva_init(model, ["backbone.*"], _batches(), rank=3, rho=2.0)
    add_adapters(model, ["backbone.*"], ranks, 6.0, init_A)
    assert torch.equal(model(x), base(x))
    for name, A in init_A.items():
        adapter = model.get_submodule(name)
        assert isinstance(adapter, LoRALinear) and adapter.scaling == 6.0 / ranks[name]
        torch.testing.assert_close(adapter.lora_A @ adapter.lora_A.T, torch.eye(len(A)), atol=1e-5, rtol=0)


def test_eva_is_deterministic_and_leaves_the_model_unchanged():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = eva_init(model, ["backbone.*"], _batches(), rank=2)
    second = eva_init(model, ["backbone.*"], _batches(), rank=2)
    assert first[0] == second[0]
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not model.backbone[1]._forward_hooks


def test_eva_rejects_bad_settings():
    with pytest.raises(ValueError, match="rho"):
        eva_init(_model(), ["backbone.*"], _batches(), rank=2, rho=0.5)
    with pytest.raises(ValueError, match="'nope'"):
        eva_init(_model(), ["nope"], _batches(), rank=2)
    with pytest.raises(ValueError, match="no inputs"):
        eva_init(_model(), ["backbone.*"], [], rank=2)
