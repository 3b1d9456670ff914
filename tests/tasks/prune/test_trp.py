import copy

import pytest
import torch
from torch import nn

from slimforge.models import CNNConfig, MLPConfig, build_model
from slimforge.training import FitConfig, fit
from tasks.prune.common import PruneContext
from tasks.prune.lowrank import (
    LowRankConv2d,
    LowRankLinear,
    energy_rank,
    factorable,
    factorize_with_ranks,
)
from tasks.prune.trp import (
    TrpConfig,
    final_ranks,
    nuclear_subgradient,
    prune_trp,
    train_trp,
    truncate_,
    truncation_rank,
)
from tasks.train.init import initialize


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _cnn(seed=0):
    model = build_model(CNNConfig(channels=[8, 16], hidden=32), (1, 8, 8), 10)
    initialize(model, "kaiming", _gen(seed))
    return model


@pytest.fixture(scope="module")
def images(digits_split):
    x, y = digits_split[0][:256], digits_split[1][:256]
    return x.view(-1, 1, 8, 8), y


@pytest.mark.parametrize("shape", [(40, 30), (16, 8, 3, 3)])
@pytest.mark.parametrize("energy", [0.5, 0.8, 0.9])
def test_truncation_leaves_rank_at_most_r_of_e(shape, energy):
    w = torch.randn(*shape, generator=_gen(1))
    r = energy_rank(torch.linalg.svdvals(w.flatten(1).double()), energy)
    assert truncation_rank(w, energy) == r
    truncate_(w, r)
    assert torch.linalg.matrix_rank(w.flatten(1)) <= r < min(w.flatten(1).shape)


def test_full_rank_truncation_keeps_the_bits():
    w = torch.randn(12, 9, generator=_gen(2))
    before = w.clone()
    truncate_(w, truncation_rank(w, 1.0))
    assert torch.equal(w, before)


@pytest.mark.parametrize("shape", [(9, 6), (6, 9), (5, 2, 3, 3)])
def test_subgradient_is_the_autograd_gradient_of_the_nuclear_norm(shape):
    w = torch.randn(*shape, generator=_gen(3), dtype=torch.float64, requires_grad=True)
    s = torch.linalg.svdvals(w.detach().flatten(1))
    assert (s[:-1] - s[1:]).min() > 1e-3 and s[-1] > 1e-3  # full rank, distinct singular values
    torch.linalg.matrix_norm(w.flatten(1), "nuc").backward()
    torch.testing.assert_close(nuclear_subgradient(w), w.grad, atol=1e-10, rtol=1e-10)


def test_subgradient_of_a_truncated_weight_ignores_rounding_noise():
    w = torch.randn(30, 20, generator=_gen(4))
    truncate_(w, 3)
    g = nuclear_subgradient(w).double()
    u, _, vh = torch.linalg.svd(w.double())
    torch.testing.assert_close(g, u[:, :3] @ vh[:3], atol=1e-5, rtol=1e-5)  # U_rV_rᵀ, spectral norm 1, rank 3
    assert torch.linalg.matrix_rank(g.float()) == 3  # full-SVD UVᵀ would have rank 20


def test_no_penalty_and_no_truncation_is_plain_fit_bit_for_bit(images):
    x, y = images
    training = FitConfig(epochs=1, batch_size=64, lr=0.05, optimizer="sgd")
    plain, trp = _cnn(5), _cnn(5)
    fit(plain, x, y, training, _gen(6))
    result = train_trp(trp, x, y, TrpConfig(energy=1.0, nuclear_weight=0.0, truncate_every=1, training=training),
                       _gen(6))
    assert result.truncations == 1 + 4  # before step 0, then after each of the 4 steps (each a no-op at e = 1)
    for (name, p), q in zip(plain.state_dict().items(), trp.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_penalty_adds_lambda_uvt_to_each_factorable_gradient_and_nothing_else(images):
    """One plain SGD step (no momentum, no decay): W' = W − lr·(∇L + λ·UVᵀ(W)) on every factorable
    weight; the head and the biases move exactly as without the penalty."""
    x, y = images
    training = FitConfig(epochs=1, batch_size=len(x), lr=0.1, optimizer="sgd", momentum=0.0, weight_decay=0.0,
                         schedule="constant")
    lam = 0.05
    start, plain, trp = _cnn(7), _cnn(7), _cnn(7)
    fit(plain, x, y, training, _gen(8))
    train_trp(trp, x, y, TrpConfig(energy=1.0, nuclear_weight=lam, training=training), _gen(8))
    layers = {f"{name}.weight" for name in factorable(start)}
    assert layers == {"backbone.body.0.weight", "backbone.body.3.weight", "backbone.body.7.weight"}
    start_state = start.state_dict()
    for (name, p), q in zip(plain.state_dict().items(), trp.state_dict().values(), strict=True):
        if name in layers:
            expected = p - training.lr * lam * nuclear_subgradient(start_state[name])
            torch.testing.assert_close(q, expected, atol=1e-6, rtol=1e-5, msg=name)
            assert not torch.equal(q, p), name
        else:
            assert torch.equal(q, p), name


def test_weights_are_low_rank_right_after_a_trp_step(images):
    """4 steps with m = 4: the run ends on a TRP step, so each weight is the rank-r(e)
    truncation of what the same run without that last truncation ends with."""
    x, y = images
    training = FitConfig(epochs=1, batch_size=64, lr=0.05, optimizer="sgd")
    truncated, untruncated = _cnn(9), _cnn(9)
    result = train_trp(truncated, x, y, TrpConfig(energy=0.8, nuclear_weight=1e-3, truncate_every=4,
                                                  training=training), _gen(10))
    train_trp(untruncated, x, y, TrpConfig(energy=0.8, nuclear_weight=1e-3, truncate_every=5, training=training),
              _gen(10))
    assert result.truncations == 2  # before step 0 and after step 4
    for name, module in factorable(truncated).items():
        before = factorable(untruncated)[name].weight.detach()
        r = truncation_rank(before, 0.8)
        assert torch.linalg.matrix_rank(module.weight.detach().flatten(1)) <= r < min(before.flatten(1).shape), name
        truncate_(before, r)
        assert torch.equal(module.weight, before), name


def test_final_model_equals_the_truncated_dense_model(images):
    x, y = images
    model = _cnn(11)
    cfg = TrpConfig(energy=0.9, nuclear_weight=1e-3, truncate_every=3,
                    training=FitConfig(epochs=2, batch_size=64, lr=0.05, optimizer="sgd"))
    train_trp(model, x, y, cfg, _gen(12))
    ranks = final_ranks(model, 0.9)
    assert ranks, "no layer paid off at e = 0.9"
    dense = copy.deepcopy(model).eval()
    for name, rank in ranks.items():
        truncate_(dense.get_submodule(name).weight, rank)
    factorize_with_ranks(model, ranks)
    assert all(isinstance(model.get_submodule(n), (LowRankLinear, LowRankConv2d)) for n in ranks)
    torch.testing.assert_close(model.eval()(x), dense(x), atol=1e-5, rtol=1e-5)


def test_prune_trp_factors_without_touching_the_head(images):
    x, y = images
    model = _cnn(13)
    head = model.head.weight.detach().clone()
    cfg = TrpConfig(energy=0.8, truncate_every=2, training=FitConfig(epochs=1, batch_size=64, optimizer="sgd",
                                                                     lr=0.05, weight_decay=0.0))
    result = prune_trp(PruneContext(model, None, (1, 8, 8), 10, x, y, _gen()), cfg)
    assert isinstance(model.head, nn.Linear) and "head" not in result.report["trp_energy_ranks"]
    assert result.ranks and set(result.ranks) <= set(result.report["trp_energy_ranks"])
    assert result.trainable is None and cfg.recovery_params == "none"
    assert result.report["trp_truncations"] == 3
    assert not torch.equal(model.head.weight, head)  # trained, but never truncated or factored


def test_mlp_layers_that_do_not_pay_off_stay_dense():
    model = build_model(MLPConfig(hidden=[16]), (8,), 10)  # 16x8: r < 16·8/24 ≈ 5.3 pays off
    initialize(model, "kaiming", _gen(14))
    assert final_ranks(model, 1.0) == {}
    assert final_ranks(model, 0.3) == {"backbone.1": truncation_rank(model.backbone[1].weight, 0.3)}
