"""The Triton fake-quant kernels against the torch reference, on CPU through TRITON_INTERPRET=1."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest
import torch

pytest.importorskip("triton")

from kernels.fake_quant import fake_quant, torch_fake_quant

if os.environ["TRITON_INTERPRET"] != "1" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is set to something other than 1 and there is no GPU", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(n, groups, g, per, bits, seed, dtype=torch.float32):
    """w (N, G, g) with an all-zero first group (its step 1) and exact half ties, s by granularity."""
    gen = torch.Generator().manual_seed(seed)
    qmax = 2 ** (bits - 1) - 1
    w = torch.randn(n, groups, g, generator=gen)
    s_shape = {"group": (n, groups, 1), "channel": (n, 1, 1), "tensor": (1, 1, 1)}[per]
    s = (w.abs().amax(dim=tuple(d for d in range(3) if s_shape[d] == 1), keepdim=True) / (qmax + 0.5))
    s = s.half().float()  # as the quantizers pass it: float16-exact, so k + 0.5 steps are exact ties
    w[0, 0] = 0.0
    if per != "tensor":
        s[0, 0] = 1.0
    ties = torch.randint(-qmax - 1, qmax, (n, groups, 3), generator=gen) + 0.5  # k + ½, inside the range
    w[1:, :, :3] = (ties * s)[1:]
    return w.to(dtype), s, torch.randn(n, groups, g, generator=gen).to(dtype)


def run(fn, w, s, upstream, bits, clip_grad, **kw):
    w = w.clone().to(DEVICE).requires_grad_(True)
    s = s.clone().to(DEVICE).requires_grad_(True)
    out = fn(w, s, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, clip_grad=clip_grad, **kw)
    out.backward(upstream.to(DEVICE))
    return out.detach().cpu(), w.grad.cpu(), s.grad.cpu()


@pytest.mark.parametrize("n,groups,g,per,bits,clip_grad", [
    (37, 3, 96, "group", 4, True),     # N·G = 111 rows: not a multiple of the row block
    (37, 3, 33, "group", 2, True),     # g not a power of two
    (37, 1, 33, "channel", 8, True),   # per channel: G = 1
    (37, 3, 33, "tensor", 4, True),    # per tensor: partial sums per row, then one sum
    (9, 2, 1500, "group", 4, True),    # g > the 1024 chunk: the loop over g with a ragged last chunk
    (37, 3, 33, "group", 4, False),    # StatsQ's identity gradient to w
])
def test_triton_matches_reference(n, groups, g, per, bits, clip_grad):
    w, s, upstream = make_case(n, groups, g, per, bits, seed=n * 100 + g + bits)
    ref = run(torch_fake_quant, w, s, upstream, bits, clip_grad)
    out = run(fake_quant, w, s, upstream, bits, clip_grad, kernel="triton")
    assert torch.equal(out[0], ref[0]), f"forward: max |diff| {(out[0] - ref[0]).abs().max().item():.3e}"
    assert torch.equal(out[1], ref[1]), f"grad_w: max |diff| {(out[1] - ref[1]).abs().max().item():.3e}"
    assert out[2].shape == s.shape
    diff = (out[2] - ref[2]).abs().max().item()
    assert torch.allclose(out[2], ref[2], rtol=1e-5, atol=1e-4), f"grad_s: max |diff| {diff:.3e}"
    assert torch.equal(out[0][0, 0], torch.zeros(g)) and torch.equal(out[1][0, 0], upstream[0, 0])  # all-zero group


def test_exact_ties_round_to_even():
    s = torch.full((1, 1, 1), 0.25)
    u = torch.tensor([-4.5, -3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 6.5])  # w / s, all exact ties
    w = (u * s).reshape(1, 1, -1)
    out = fake_quant(w.to(DEVICE), s.to(DEVICE), -8, 7, kernel="triton").cpu()
    assert torch.equal(out, torch_fake_quant(w, s, -8, 7, clip_grad=True))
    assert (out.flatten() / 0.25).tolist() == [-4.0, -4.0, -2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 4.0, 6.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_precision_weights(dtype):
    w, s, upstream = make_case(11, 3, 40, "group", 4, seed=5, dtype=dtype)
    ref = run(torch_fake_quant, w, s, upstream, 4, True)
    out = run(fake_quant, w, s, upstream, 4, True, kernel="triton")
    assert out[0].dtype == dtype and out[1].dtype == dtype and out[2].dtype == torch.float32
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    diff = (out[2] - ref[2]).abs().max().item()
    assert torch.allclose(out[2], ref[2], rtol=1e-5, atol=1e-4), f"grad_s: max |diff| {diff:.3e}"


def test_fixed_step_takes_no_gradient():
    w, s, upstream = make_case(5, 2, 16, "group", 4, seed=6)
    wl = w.clone().to(DEVICE).requires_grad_(True)
    fake_quant(wl, s.to(DEVICE), -8, 7, kernel="triton").backward(upstream.to(DEVICE))
    ref = w.clone().requires_grad_(True)
    torch_fake_quant(ref, s, -8, 7, clip_grad=True).backward(upstream)
    assert torch.equal(wl.grad.cpu(), ref.grad)
