import pytest
import torch

from kernels.merge import torch_task_vector_merge
from tasks.merge.dare import tensor_seed
from tasks.merge.task_arithmetic import TaskVectorConfig, merge_task_vectors, task_vectors


def dare(tau, p, seed, rescale=None, offset=0):
    """DARE of one task vector alone: the merge op with θ₀ = 0, λ = 1 and K = 1."""
    return torch_task_vector_merge(torch.zeros_like(tau), tau[None], 1.0, drop=p, seeds=torch.tensor([seed]),
                                   rescale=rescale, offset=offset)


def _sd(seed):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(30, 20, generator=g), "b": torch.randn(25, generator=g)}


def test_p_zero_is_the_identity_and_equals_task_arithmetic():
    base, ft1, ft2 = _sd(0), _sd(1), _sd(2)
    taus = task_vectors(base, [ft1, ft2])
    assert torch.equal(dare(taus[0]["a"], 0.0, 0), taus[0]["a"])
    plain = merge_task_vectors(base, taus, 0.4)
    dared = merge_task_vectors(base, taus, 0.4, TaskVectorConfig(method="dare", drop=0.0))
    for name in base:
        assert torch.equal(dared[name], plain[name])


def test_expectation_is_preserved_and_drop_share_is_p():
    tau = torch.randn(200, generator=torch.Generator().manual_seed(0))
    p, n = 0.7, 2000
    draws = torch.stack([dare(tau, p, tensor_seed(s, 0, "w")) for s in range(n)])  # (n, 200)
    share = float((draws == 0).float().mean())
    assert abs(share - p) < 4 * (p * (1 - p) / draws.numel()) ** 0.5, share
    # per entry: DARE(τ) is τ/(1−p) w.p. 1−p, so its std is |τ|·sqrt(p/(1−p))
    sigma = tau.abs() * (p / (1 - p)) ** 0.5 / n ** 0.5
    assert ((draws.mean(0) - tau).abs() <= 3 * sigma + 1e-6).float().mean() > 0.99


def test_darex_q_divides_survivors_by_q():
    tau = torch.ones(1000)
    out = dare(tau, 0.9, 0, rescale=0.5)
    assert set(out.unique().tolist()) == {0.0, 2.0}


def test_same_seed_same_mask_other_seed_other_mask_and_order_free():
    tau = torch.randn(500, generator=torch.Generator().manual_seed(0))
    a = dare(tau, 0.5, tensor_seed(3, 1, "layer.weight"))
    assert torch.equal(a, dare(tau, 0.5, tensor_seed(3, 1, "layer.weight")))
    assert not torch.equal(a, dare(tau, 0.5, tensor_seed(4, 1, "layer.weight")))
    assert not torch.equal(a, dare(tau, 0.5, tensor_seed(3, 2, "layer.weight")))
    base, ft = _sd(0), _sd(1)
    cfg = TaskVectorConfig(method="dare", drop=0.5, seed=3)
    taus = task_vectors(base, [ft])
    forward = merge_task_vectors(base, taus, 1.0, cfg)
    backward = merge_task_vectors(dict(reversed(base.items())), taus, 1.0, cfg)
    assert all(torch.equal(forward[k], backward[k]) for k in base)


def test_a_block_of_rows_draws_the_rows_of_the_whole_mask():
    tau = torch.randn(40, 7, generator=torch.Generator().manual_seed(0))
    whole = dare(tau, 0.6, 11)
    assert torch.equal(dare(tau[13:29], 0.6, 11, offset=13 * 7), whole[13:29])


def test_bad_drop_probability_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        dare(torch.ones(3), 1.0, 0)
