"""The W8A8 torch reference (kernels/w8a8.py): activation quantizer and exact int32 accumulation."""

import pytest
import torch

import kernels
from kernels.w8a8 import quantize_activations, torch_w8a8_matmul, w8a8_int_mm


def test_per_token_scales_are_row_max_over_127():
    x = torch.tensor([[1.0, -254.0, 3.0], [0.0, 0.0, 0.0], [0.5, 0.25, -0.127]])
    q, s = quantize_activations(x, "per_token")
    torch.testing.assert_close(s, torch.tensor([2.0, 1.0, 0.5 / 127]))  # all-zero row: scale 1
    assert q.dtype == torch.int8 and q[0].tolist() == [0, -127, 2] and q[1].tolist() == [0, 0, 0]
    assert q[2, 0] == 127 and q.abs().max() <= 127
    q_t, s_t = quantize_activations(x, "per_tensor")
    assert torch.equal(s_t, torch.full((3,), 2.0)) and q_t[2].tolist() == [0, 0, 0]


def test_quantization_error_is_at_most_half_a_step():
    x = torch.randn(33, 70, generator=torch.Generator().manual_seed(0)) * 3
    for gran in ("per_token", "per_tensor"):
        q, s = quantize_activations(x, gran)
        err = (q.float() * s[:, None] - x).abs()
        assert bool((err <= s[:, None] / 2 + 1e-6).all()), f"{gran}: max err {err.max().item():.3e}"
    with pytest.raises(ValueError, match="per_channel"):
        quantize_activations(x, "per_channel")


def test_int_mm_is_exact_at_the_int8_extremes():
    k = 4096  # 4096·127² overflows float32's exact integers but not float64's
    x = torch.full((2, k), 127, dtype=torch.int8)
    w = torch.full((3, k), -127, dtype=torch.int8)
    w[1] = 127
    acc = w8a8_int_mm(x, w)
    assert acc.dtype == torch.int32
    assert acc[0].tolist() == [-127 * 127 * k, 127 * 127 * k, -127 * 127 * k]
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(-127, 128, (5, 99), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (7, 99), generator=gen, dtype=torch.int8)
    assert torch.equal(w8a8_int_mm(a, b), (a.long() @ b.long().t()).to(torch.int32))


def test_reference_rescales_by_token_and_channel():
    gen = torch.Generator().manual_seed(2)
    a = torch.randint(-127, 128, (4, 24), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (6, 24), generator=gen, dtype=torch.int8)
    sx, sw = torch.rand(4, generator=gen), torch.rand(6, generator=gen)
    want = (a.double() @ b.double().t()) * sx.double()[:, None] * sw.double()[None, :]
    out = kernels.w8a8_matmul(a, sx, b, sw, kernel="torch")
    torch.testing.assert_close(out, want.float(), rtol=1e-6, atol=0)
    assert torch.equal(torch_w8a8_matmul(a, sx, b, sw, torch.int32), w8a8_int_mm(a, b))
    with pytest.raises(ValueError, match="x_scales must be"):
        kernels.w8a8_matmul(a, sx[:3], b, sw, kernel="torch")
    with pytest.raises(ValueError, match="int8"):
        kernels.w8a8_matmul(a.int(), sx, b, sw, kernel="torch")
