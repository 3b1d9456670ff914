"""torch's packed CPU ops (kernels/cpu.py) against dequantize-then-matmul references."""

import pytest
import torch

from kernels.cpu import (
    int4_weight_matmul,
    int8_dynamic_available,
    int8_dynamic_matmul,
    int8_weight_matmul,
    prepare_int4_cpu,
    prepare_int8_dynamic,
    supports_int4_cpu,
)
from kernels.int4 import pack_int4, torch_w4a16_matmul
from kernels.w8a8 import quantize_activations, torch_w8a8_matmul


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref.double() - out.double()).pow(2).sum().clamp_min(1e-300)
    return 10 * torch.log10(ref.double().pow(2).sum() / noise).item()


def assert_sqnr(ref, out, floor=40.0):
    db, diff = sqnr_db(ref, out.float()), (ref - out.float()).abs().max().item()
    assert db >= floor, f"SQNR {db:.1f} dB < {floor}, max |diff| {diff:.3e}"


@pytest.mark.parametrize("m,n,k", [(1, 37, 96), (5, 10, 784), (17, 64, 40), (3, 37, 97), (2, 5, 3)])
def test_int8_matches_dequantized_matmul(m, n, k):
    gen = torch.Generator().manual_seed(m + n + k)
    w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    s = torch.rand(n, generator=gen) * 0.01 + 1e-3
    x = torch.randn(m, k, generator=gen)
    ref = x @ (w.float() * s[:, None]).t()  # (M, N)
    out = int8_weight_matmul(x, w, s)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert_sqnr(ref, out)  # K % 8 != 0 takes the fp32 path instead of crashing


def test_supports_int4_cpu():
    assert supports_int4_cpu(128, 1568, 32)
    assert not supports_int4_cpu(10, 128, 32)  # N % 16
    assert not supports_int4_cpu(128, 784, 16)  # group size
    assert not supports_int4_cpu(128, 96, 64)  # K % group
    with pytest.raises(ValueError, match="does not fit"):
        prepare_int4_cpu(torch.zeros(10, 64, dtype=torch.uint8), torch.ones(10, 2), torch.zeros(10, 2), 32)


@pytest.mark.parametrize("m,n,k,g", [(1, 32, 64, 32), (7, 48, 256, 64), (16, 16, 256, 256), (33, 128, 1568, 32)])
def test_int4_matches_reference(m, n, k, g):
    gen = torch.Generator().manual_seed(m * n + g)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    s = torch.rand(n, k // g, generator=gen) * 0.05 + 1e-3
    z = torch.randint(0, 16, (n, k // g), generator=gen).float()
    z[0, 0] = 8.0  # a symmetric-style group among asymmetric ones
    x = torch.randn(m, k, generator=gen)
    ref = torch_w4a16_matmul(x, pack_int4(q), s, z, g)  # (M, N)
    packed, scales_and_zeros = prepare_int4_cpu(q, s, z, g)
    assert packed.dtype == torch.uint8 and scales_and_zeros.shape == (k // g, n, 2)
    out = int4_weight_matmul(x, packed, scales_and_zeros, g)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert_sqnr(ref, out)


def test_int4_zero_convention_is_bias_style():
    """w = (q - 8) * scale + zero: with scale 1 and zero 8 the op returns the raw codes."""
    q = torch.arange(32 * 16).remainder(16).reshape(16, 32).to(torch.uint8)  # (N, K)
    packed, _ = prepare_int4_cpu(q, torch.ones(16, 1), torch.zeros(16, 1), 32)
    sz = torch.tensor([1.0, 8.0]).expand(1, 16, 2).contiguous()
    eye = torch.eye(32)
    out = torch._weight_int4pack_mm_for_cpu(eye, packed, 32, sz)  # (K, N) = qᵀ
    assert torch.equal(out, q.t().float())


def test_int4_recentres_low_bit_codes():
    """2-bit codes in [0, 3] are shifted towards the op's implicit 8: bf16 error stays at the weight's scale."""
    gen = torch.Generator().manual_seed(5)
    n, k, g = 32, 128, 32
    q = torch.randint(0, 4, (n, k), generator=gen, dtype=torch.uint8)
    s = torch.rand(n, k // g, generator=gen) * 0.05 + 1e-3
    z = torch.randint(0, 4, (n, k // g), generator=gen).float()
    x = torch.randn(4, k, generator=gen)
    ref = torch_w4a16_matmul(x, pack_int4(q), s, z, g)
    packed, scales_and_zeros = prepare_int4_cpu(q, s, z, g)
    assert_sqnr(ref, int4_weight_matmul(x, packed, scales_and_zeros, g), floor=45.0)


@pytest.mark.skipif(not int8_dynamic_available(), reason="torch built without a quantized CPU engine")
@pytest.mark.parametrize("per_token", [False, True])
def test_int8_dynamic_matches_w8a8_reference(per_token):
    """fbgemm's dynamic int8 Linear vs kernels.w8a8 on the same codes: a 7-bit activation grid, so an SQNR floor;
    per token it keeps a small-magnitude token that a per-tensor grid flattens."""
    gen = torch.Generator().manual_seed(11)
    w = torch.randint(-127, 128, (40, 96), generator=gen, dtype=torch.int8)
    s = torch.rand(40, generator=gen) * 0.01 + 1e-3
    x = torch.randn(6, 96, generator=gen)
    x[0] *= 1e-3  # a quiet token
    gran = "per_token" if per_token else "per_tensor"
    ref = torch_w8a8_matmul(*quantize_activations(x, gran), w, s)
    out = int8_dynamic_matmul(x, prepare_int8_dynamic(w, s), per_token=per_token)
    assert out.shape == (6, 40) and out.dtype == torch.float32
    assert_sqnr(ref, out, floor=30.0)
    quiet = x[:1] @ (w.float() * s[:, None]).t()
    quiet_db = sqnr_db(quiet, out[:1])
    assert (quiet_db >= 30) == per_token, f"quiet token SQNR {quiet_db:.1f} dB"


@pytest.mark.skipif(not int8_dynamic_available(), reason="torch built without a quantized CPU engine")
def test_int8_dynamic_bias_in_the_op_equals_adding_it_after():
    gen = torch.Generator().manual_seed(12)
    w = torch.randint(-127, 128, (40, 96), generator=gen, dtype=torch.int8)
    s = torch.rand(40, generator=gen) * 0.01 + 1e-3
    b = torch.randn(40, generator=gen)
    x = torch.randn(6, 96, generator=gen)
    fused = int8_dynamic_matmul(x, prepare_int8_dynamic(w, s, b))
    after = int8_dynamic_matmul(x, prepare_int8_dynamic(w, s)) + b
    torch.testing.assert_close(fused, after, atol=1e-5, rtol=1e-5)
    packed = prepare_int8_dynamic(w, s)  # per token the bias joins the row rescale instead
    fused = int8_dynamic_matmul(x, packed, per_token=True, bias=b)
    torch.testing.assert_close(fused, int8_dynamic_matmul(x, packed, per_token=True) + b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="prepack the bias"):
        int8_dynamic_matmul(x, packed, bias=b)
