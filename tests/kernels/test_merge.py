"""The torch reference of the fused task-vector merge against the tasks.merge building blocks."""

import pytest
import torch

from kernels.merge import (
    dare_keep,
    disjoint_mean,
    philox_uniform,
    task_vector_merge,
    torch_task_vector_merge,
)
from tasks.merge.ties import keep_threshold


def _case(k, shape=(37, 91), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn((k, *shape), generator=g)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_ties_equals_trim_and_disjoint_mean_bit_for_bit(k):
    w0, deltas = _case(k)
    thr = [keep_threshold(d.abs().flatten(), 0.3) for d in deltas]
    want = w0 + 0.7 * disjoint_mean([torch.where(d.abs() >= t, d, 0.0) for d, t in zip(deltas, thr)])
    got = torch_task_vector_merge(w0, deltas, 0.7, torch.tensor(thr), elect=True)
    assert torch.equal(got, want), f"max |diff| {(got - want).abs().max().item():.3e}"


def test_sum_is_task_arithmetic_and_lambda_zero_is_the_identity():
    w0, deltas = _case(3)
    want = w0 + 0.4 * (deltas[0] + deltas[1] + deltas[2])
    assert torch.equal(torch_task_vector_merge(w0, deltas, 0.4), want)
    for elect in (False, True):
        out = torch_task_vector_merge(w0, deltas, 0.0, torch.full((3,), 0.5), 0.5, torch.arange(3), elect=elect)
        assert torch.equal(out, w0)


def test_ties_of_one_task_is_its_trimmed_vector():
    w0, deltas = _case(1)
    out = torch_task_vector_merge(w0, deltas, 1.0, torch.tensor([0.8]), elect=True)
    torch.testing.assert_close(out - w0, torch.where(deltas[0].abs() >= 0.8, deltas[0], 0.0), rtol=0, atol=1e-6)


def test_dare_with_p_zero_is_task_arithmetic():
    w0, deltas = _case(3)
    plain = torch_task_vector_merge(w0, deltas, 0.5)
    assert torch.equal(torch_task_vector_merge(w0, deltas, 0.5, drop=0.0, seeds=torch.arange(3)), plain)


def test_dare_keeps_one_minus_p_and_rescales_survivors():
    w0, ones = torch.zeros(20_000), torch.ones(2, 20_000)
    p = 0.7
    out = torch_task_vector_merge(w0, ones, 1.0, drop=p, seeds=torch.tensor([5, 6]))  # 0, 1/(1-p) or 2/(1-p)
    kept = torch.round(out * (1 - p)).to(torch.int64)  # survivors per entry, 0..2
    share = float(kept.sum()) / ones.numel()
    assert abs(share - (1 - p)) < 4 * (p * (1 - p) / ones.numel()) ** 0.5, share
    q = torch_task_vector_merge(w0, ones[:1], 1.0, drop=p, seeds=torch.tensor([5]), rescale=0.5)
    assert set(q.unique().tolist()) == {0.0, 2.0}


def test_dare_masks_of_a_block_are_the_whole_masks_rows():
    w0, deltas = _case(2, (40, 9))
    seeds = torch.tensor([3, 2**62 + 1])
    whole = torch_task_vector_merge(w0, deltas, 1.0, drop=0.5, seeds=seeds, elect=True)
    block = torch_task_vector_merge(w0[11:30], deltas[:, 11:30], 1.0, drop=0.5, seeds=seeds, elect=True, offset=11 * 9)
    assert torch.equal(block, whole[11:30])


def test_uniforms_are_uniform_and_the_mask_depends_on_the_seed():
    u = philox_uniform(7, 2**34 - 5000, 10000)  # the counters (index // 4) cross into the high word
    assert u.dtype == torch.float32 and 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 4 * (1 / 12 / u.numel()) ** 0.5
    assert not torch.equal(dare_keep((1000,), 0.5, 1), dare_keep((1000,), 0.5, 2))


def test_half_inputs_accumulate_in_float32_and_keep_their_dtype():
    w0, deltas = _case(3)
    out = torch_task_vector_merge(w0.half(), deltas.half(), 0.3, elect=True)
    want = torch_task_vector_merge(w0.half().float(), deltas.half().float(), 0.3, elect=True)
    assert out.dtype == torch.float16 and torch.equal(out, want.half())
    assert torch_task_vector_merge(w0.half(), deltas, 0.3).dtype == torch.float32


def test_bad_arguments_are_refused_with_the_expected_shape():
    w0, deltas = _case(2, (4, 3))
    with pytest.raises(ValueError, match=r"\(K, 4, 3\)"):
        torch_task_vector_merge(w0, deltas[:, :2], 1.0)
    with pytest.raises(ValueError, match="seeds"):
        torch_task_vector_merge(w0, deltas, 1.0, drop=0.5)
    with pytest.raises(ValueError, match="kernel"):
        task_vector_merge(w0, deltas, 1.0, kernel="cuda")


def test_uniforms_of_a_range_do_not_depend_on_where_the_range_starts():
    """Chunks of Philox counters and unaligned starts give each index the same uniform."""
    whole = philox_uniform(3, 3, 40003)  # spans chunk boundaries (4·4096 indices each)
    assert torch.equal(philox_uniform(3, 3 + 16381, 9), whole[16381:16390])
    assert torch.equal(philox_uniform(3, 10005, 30000), whole[10002:40002])
