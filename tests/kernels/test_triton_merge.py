"""The Triton fused merge against the torch reference, on CPU through TRITON_INTERPRET=1."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest
import torch

pytest.importorskip("triton")

import triton
import triton.language as tl

from kernels.merge import philox_uniform, task_vector_merge, torch_task_vector_merge
from kernels.triton_merge import counter_uniform

if os.environ["TRITON_INTERPRET"] != "1" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is set to something other than 1 and there is no GPU", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _uniform_kernel(out_ptr, seed, start, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, counter_uniform(seed, start + i.to(tl.int64)))


@triton.jit
def _rand_kernel(out_ptr, seed, start, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, tl.rand(seed, start + i.to(tl.int64)))


@pytest.mark.parametrize("seed", [0, 123, 2**40 + 7, 2**63 - 1])
@pytest.mark.parametrize("start", [0, 5, 2**34 - 63, 2**40 + 3])  # unaligned starts; counters past 2³²
def test_torch_philox_is_the_kernels_uniform_bit_for_bit(seed, start):
    out = torch.empty(128, device=DEVICE)
    _uniform_kernel[(1,)](out, seed, start, N=128)
    want = philox_uniform(seed, start, 128)
    assert torch.equal(out.cpu(), want), f"{int((out.cpu() != want).sum())} of 128 uniforms differ"


def test_every_fourth_uniform_is_tl_rand_of_its_counter():
    """Word 0 of counter c is what Triton's own tl.rand(seed, c) returns: the scheme is Triton's Philox."""
    out = torch.empty(64, device=DEVICE)
    _rand_kernel[(1,)](out, 99, 2**33, N=64)
    want = philox_uniform(99, 4 * 2**33, 4 * 64)[::4]
    assert torch.equal(out.cpu(), want)


def _case(k, shape, seed, kind="randn"):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(shape, generator=g)
    if kind == "zeros":
        deltas = torch.zeros((k, *shape))
    elif kind == "ties":  # exact sign ties: pairs of ±x (mass 0) plus one zero row when K is odd
        x = torch.randn(shape, generator=g)
        deltas = torch.stack([x if i % 2 == 0 else -x for i in range(k - k % 2)] + [torch.zeros(shape)] * (k % 2))
    else:
        deltas = torch.randn((k, *shape), generator=g)
    return w0, deltas


SETTINGS = {  # thresholds (None or a share of the max trimmed), drop, rescale, elect
    "sum": (None, 0.0, None, False),
    "ties": (0.3, 0.0, None, True),
    "trim_all": (2.0, 0.0, None, True),
    "dare": (None, 0.6, None, False),
    "dare_ties_q": (0.2, 0.6, 0.5, True),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("k,shape,kind", [
    (1, (37, 91), "randn"),
    (3, (1000,), "randn"),
    (5, (37, 91), "randn"),
    (3, (1000,), "zeros"),
    (4, (37, 91), "ties"),
])
def test_triton_matches_reference_bit_for_bit(setting, k, shape, kind):
    w0, deltas = _case(k, shape, seed=k * 100 + len(shape), kind=kind)
    share, drop, rescale, elect = SETTINGS[setting]
    thr = None if share is None else deltas.abs().flatten(1).max(1).values * share  # (K,)
    seeds = torch.tensor([2**62 + 9 * i for i in range(k)]) if drop else None
    offset = 2**32 - 500  # the counters cross 2³²
    ref = torch_task_vector_merge(w0, deltas, 0.7, thr, drop, seeds, rescale, elect, offset)
    args = [t.to(DEVICE) if t is not None else None for t in (w0, deltas, thr, seeds)]
    out = task_vector_merge(args[0], args[1], 0.7, args[2], drop, args[3], rescale, elect, offset, kernel="triton").cpu()
    assert out.shape == w0.shape and out.dtype == ref.dtype
    assert torch.equal(out, ref), f"max |diff| {(out - ref).abs().max().item():.3e}"
    if setting == "trim_all" or kind == "zeros" or (kind == "ties" and elect and not drop):  # nothing survives
        assert torch.equal(out, w0)


def test_half_weights_are_written_in_half():
    w0, deltas = _case(3, (37, 91), seed=1)
    ref = torch_task_vector_merge(w0.half(), deltas.half(), 0.5, elect=True)
    out = task_vector_merge(w0.half().to(DEVICE), deltas.half().to(DEVICE), 0.5, elect=True, kernel="triton").cpu()
    assert out.dtype == torch.float16 and torch.equal(out, ref), f"max |diff| {(out - ref).abs().max().item():.3e}"
