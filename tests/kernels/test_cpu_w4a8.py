"""onnxruntime's W4A8 MatMulNBits (kernels/cpu_w4a8.py) against its torch reference."""

import copy

import pytest
import torch

from kernels.cpu_w4a8 import (
    prepare_w4a8_cpu,
    quantize_activation_blocks,
    supports_w4a8_cpu,
    torch_w4a8_matmul,
    w4a8_available,
    w4a8_matmul,
    w4a8_session,
)

pytestmark = pytest.mark.skipif(not w4a8_available(), reason="onnxruntime (the [cpu] extra) is not installed")


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref.double() - out.double()).pow(2).sum().clamp_min(1e-300)
    return 10 * torch.log10(ref.double().pow(2).sum() / noise).item()


def random_weight(n: int, k: int, g: int, gen: torch.Generator, high: int = 16):
    blocks = -(-k // g)
    codes = torch.randint(0, high, (n, k), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, blocks, generator=gen) * 0.02 + 1e-3
    zeros = torch.randint(0, high, (n, blocks), generator=gen).float()
    return codes, scales, zeros


def run_kernel(x, codes, scales, zeros, g, threads=1):
    session = w4a8_session(prepare_w4a8_cpu(codes, scales, zeros, g), codes.shape[1], g, threads)
    return w4a8_matmul(x, session)


@pytest.mark.parametrize("m,n,k,g", [(1, 37, 96, 32), (5, 64, 100, 32), (3, 48, 784, 16), (17, 16, 256, 128),
                                     (2, 8, 1823, 256), (4, 33, 64, 64)])
def test_matches_reference(m, n, k, g):
    gen = torch.Generator().manual_seed(m * n + k)
    codes, scales, zeros = random_weight(n, k, g, gen)
    x = torch.randn(m, k, generator=gen)
    ref = torch_w4a8_matmul(x, codes, scales, zeros, g)
    out = run_kernel(x, codes, scales, zeros, g)
    assert out.shape == (m, n) and out.dtype == torch.float32
    db = sqnr_db(ref, out)
    assert db > 90, f"SQNR to the W4A8 reference {db:.1f} dB, max |diff| {(ref - out).abs().max():.3e}"
    dense = x @ (scales.repeat_interleave(g, 1)[:, :k] * (codes.float() - zeros.repeat_interleave(g, 1)[:, :k])).t()
    assert 30 < sqnr_db(dense, out) < db  # int8 activations cost precision; the reference models exactly that


def test_zero_blocks_and_low_bit_codes():
    gen = torch.Generator().manual_seed(7)
    codes, scales, zeros = random_weight(32, 160, 32, gen, high=4)  # 2-bit codes in a nibble
    x = torch.randn(6, 160, generator=gen)
    x[:, 32:64] = 0  # an all-zero activation block: scale 0, codes 0
    x[2] = 0  # an all-zero row
    ref = torch_w4a8_matmul(x, codes, scales, zeros, 32)
    out = run_kernel(x, codes, scales, zeros, 32)
    assert torch.equal(out[2], torch.zeros(32))
    assert sqnr_db(ref, out) > 90


def test_two_threads_give_the_same_answer():
    gen = torch.Generator().manual_seed(3)
    codes, scales, zeros = random_weight(256, 512, 128, gen)
    x = torch.randn(9, 512, generator=gen)
    assert torch.allclose(run_kernel(x, codes, scales, zeros, 128, 1), run_kernel(x, codes, scales, zeros, 128, 2),
                          rtol=1e-5, atol=1e-5)


def test_activation_blocks_round_trip():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 70, generator=gen)
    codes, d = quantize_activation_blocks(x, 32)  # 3 blocks, the last 6 wide plus padding
    assert codes.shape == (4, 3, 32) and d.shape == (4, 3, 1)
    assert codes.abs().amax(dim=2).eq(127).all()  # each block's largest |x| lands on the grid's end
    assert torch.equal(codes[:, 2, 6:], torch.zeros(4, 26, dtype=torch.int8))  # padding stays zero
    x_hat = (codes.float() * d).reshape(4, -1)[:, :70]
    assert ((x_hat - x).abs() <= d.repeat_interleave(32, 1).reshape(4, -1)[:, :70] / 2 + 1e-7).all()


def test_refusals():
    gen = torch.Generator().manual_seed(0)
    codes, scales, zeros = random_weight(16, 96, 32, gen)
    assert supports_w4a8_cpu(32, zeros) and not supports_w4a8_cpu(24, zeros)
    assert not supports_w4a8_cpu(32, zeros + 0.5)  # MatMulNBits zero points are integers
    with pytest.raises(ValueError, match="group_size must be one of"):
        prepare_w4a8_cpu(codes, scales, zeros, 48)
    with pytest.raises(ValueError, match=r"scales and zeros must be \(16, 3\)"):
        prepare_w4a8_cpu(codes, scales[:, :2], zeros[:, :2], 32)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\]"):
        prepare_w4a8_cpu(codes + 16, scales, zeros, 32)


def test_session_outlives_a_deep_copy_of_its_weight():
    gen = torch.Generator().manual_seed(5)
    codes, scales, zeros = random_weight(16, 64, 32, gen)
    weight = copy.deepcopy(prepare_w4a8_cpu(codes, scales, zeros, 32))
    x = torch.randn(2, 64, generator=gen)
    assert sqnr_db(torch_w4a8_matmul(x, codes, scales, zeros, 32), w4a8_matmul(x, w4a8_session(weight, 64, 32, 1))) > 90
