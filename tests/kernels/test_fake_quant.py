"""The fake-quant spec (kernels/fake_quant.py): forward, the STE and LSQ gradients, the dispatch."""

import subprocess
import sys

import pytest
import torch

from kernels.fake_quant import fake_quant, torch_fake_quant


def composed(w, s, qmin, qmax):
    """The QAT quantizers' former autograd composition: round_pass(clamp(w / s)) · s."""
    r = torch.clamp(w / s, qmin, qmax)
    return (r + (torch.round(r) - r).detach()) * s


def grads(fn, w, s, upstream, **kw):
    w, s = w.clone().requires_grad_(True), s.clone().requires_grad_(True)
    out = fn(w, s, -4, 3, **kw)
    (out * upstream).sum().backward()
    return out.detach(), w.grad, s.grad


@pytest.mark.parametrize("s_shape", [(5, 3, 1), (5, 1, 1), (1, 1, 1)])
def test_forward_and_gradients_equal_the_former_composition(s_shape):
    gen = torch.Generator().manual_seed(0)
    w_shape = (5, s_shape[1] if s_shape[0] == 5 else 3, 12)
    w = torch.randn(w_shape, generator=gen)
    s = torch.rand(s_shape, generator=gen) * 0.3 + 0.2  # clips some weights at 3 bits
    upstream = torch.randn(w_shape, generator=gen)
    out, gw, gs = grads(torch_fake_quant, w, s, upstream, clip_grad=True)
    ref_out, ref_gw, ref_gs = grads(composed, w, s, upstream)
    assert torch.equal(out, ref_out)
    assert torch.allclose(gw, ref_gw, atol=1e-6), f"max |diff| {(gw - ref_gw).abs().max().item():.3e}"
    assert gs.shape == s.shape
    assert torch.allclose(gs, ref_gs, atol=1e-5), f"max |diff| {(gs - ref_gs).abs().max().item():.3e}"


def test_forward_is_clamped_rounding_with_ties_to_even():
    s = torch.tensor(0.5).reshape(1, 1, 1)
    u = torch.tensor([-9.0, -4.5, -3.5, -0.5, 0.5, 1.5, 2.5, 2.4, 3.5, 7.0])  # w / s, exact halves included
    out = torch_fake_quant((u * s).reshape(1, 1, -1), s, -4, 3, clip_grad=True)
    assert out.flatten().tolist() == [-2.0, -2.0, -2.0, -0.0, 0.0, 1.0, 1.0, 1.0, 1.5, 1.5]
    assert torch.equal(out.flatten() / 0.5, torch.clamp(torch.round(u), -4, 3))


def test_gradient_to_w_is_clipped_or_the_identity():
    w = torch.tensor([-3.0, -2.0, -1.3, 0.2, 1.0, 1.4, 5.0]).reshape(1, 1, -1)
    s = torch.ones(1, 1, 1)
    upstream = torch.arange(1.0, 8.0).reshape(1, 1, -1)
    for clip, expected in ((True, [0.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0]), (False, upstream.flatten().tolist())):
        wl = w.clone().requires_grad_(True)
        (torch_fake_quant(wl, s, -2, 1, clip_grad=clip) * upstream).sum().backward()
        assert wl.grad.flatten().tolist() == expected  # [-2, 1] inclusive when clipped


def test_gradient_to_s_is_lsq_eq3_by_hand():
    # s = 2: u = w / s = [-10, 0.3, 0.5, 2.6, 9] on the 2-bit grid [-2, 1]
    w = torch.tensor([-20.0, 0.6, 1.0, 5.2, 18.0]).reshape(1, 1, -1)
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).reshape(1, 1, -1)
    s = torch.full((1, 1, 1), 2.0, requires_grad=True)
    (torch_fake_quant(w, s, -2, 1, clip_grad=True) * upstream).sum().backward()
    # below: qmin; inside: round(u) - u (0.5 ties to 0); above: qmax
    expected = -2 * 1 + (0 - 0.3) * 2 + (0 - 0.5) * 3 + 1 * 4 + 1 * 5
    assert s.grad.shape == (1, 1, 1) and abs(s.grad.item() - expected) < 1e-5, (s.grad, expected)
    s2 = torch.full((1, 1, 1), 2.0, requires_grad=True)  # the same with the identity STE: s's gradient is unchanged
    (torch_fake_quant(w, s2, -2, 1, clip_grad=False) * upstream).sum().backward()
    assert torch.equal(s2.grad, s.grad)


def test_per_group_steps_get_their_own_sums_and_a_fixed_step_none():
    gen = torch.Generator().manual_seed(1)
    w, upstream = torch.randn(4, 3, 8, generator=gen), torch.randn(4, 3, 8, generator=gen)
    s = (torch.rand(4, 3, 1, generator=gen) + 0.1).requires_grad_(True)
    (torch_fake_quant(w, s, -8, 7, clip_grad=True) * upstream).sum().backward()
    u = w / s.detach()
    d = torch.where(u < -8, -8.0, torch.where(u > 7, 7.0, torch.round(u) - u))
    assert torch.allclose(s.grad, (d * upstream).sum(2, keepdim=True), atol=1e-6)
    wl = w.clone().requires_grad_(True)
    fixed = s.detach()
    torch_fake_quant(wl, fixed, -8, 7, clip_grad=True).sum().backward()
    assert fixed.grad is None and wl.grad is not None


def test_half_precision_weights_come_back_in_their_dtype():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(3, 2, 16, generator=gen).bfloat16().requires_grad_(True)
    s = torch.full((3, 2, 1), 0.25, requires_grad=True)
    out = torch_fake_quant(w, s, -8, 7, clip_grad=True)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (torch.clamp(torch.round(w.detach().float() / 0.25), -8, 7) * 0.25).bfloat16())
    out.float().sum().backward()
    assert w.grad.dtype == torch.bfloat16 and s.grad.dtype == torch.float32


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"s must be a float \(N, G, 1\)"):
        torch_fake_quant(torch.zeros(2, 3, 4), torch.ones(2, 1, 1), -8, 7, clip_grad=True)
    with pytest.raises(ValueError, match=r"w must be a float \(N, G, g\)"):
        torch_fake_quant(torch.zeros(2, 12), torch.ones(1, 1, 1), -8, 7, clip_grad=True)


def test_dispatch_runs_the_reference_on_cpu_and_never_imports_triton():
    gen = torch.Generator().manual_seed(3)
    w, s = torch.randn(2, 2, 8, generator=gen), torch.rand(2, 2, 1, generator=gen) + 0.1
    assert torch.equal(fake_quant(w, s, -2, 1, kernel="auto"), torch_fake_quant(w, s, -2, 1, clip_grad=True))
    code = ("import sys, torch; from kernels import fake_quant; "
            "fake_quant(torch.ones(1, 1, 4), torch.ones(1, 1, 1), -2, 1, kernel='torch'); "
            "assert 'triton' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
