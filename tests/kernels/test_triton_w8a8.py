"""The Triton W8A8 kernel against the torch reference, on CPU through TRITON_INTERPRET=1."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest
import torch

pytest.importorskip("triton")

import kernels
from kernels.w8a8 import quantize_activations, torch_w8a8_matmul

if os.environ["TRITON_INTERPRET"] != "1" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is set to something other than 1 and there is no GPU", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(m, n, k, seed, zero_rows=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    x[:, k // 3] *= 40  # an outlier channel, as SmoothQuant sees
    if zero_rows:
        x[0] = 0.0
    x_q, x_s = quantize_activations(x, "per_token")
    w_q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    w_s = torch.rand(n, generator=gen) * 0.01 + 1e-4
    return x_q, x_s, w_q, w_s


SHAPES = [
    (1, 37, 96, False),    # decode row, awkward N, K = 1.5 blocks
    (5, 23, 70, True),     # K not a block multiple, an all-zero token
    (18, 65, 160, False),  # M and N just past a tile
    (3, 17, 781, False),   # long odd K
]


@pytest.mark.parametrize("m,n,k,zero_rows", SHAPES, ids=[f"{s[0]}x{s[1]}x{s[2]}" for s in SHAPES])
def test_triton_matches_reference(m, n, k, zero_rows):
    args = make_case(m, n, k, seed=m * 1000 + n, zero_rows=zero_rows)
    on_device = [t.to(DEVICE) for t in args]
    acc_ref = torch_w8a8_matmul(*args, out_dtype=torch.int32)
    acc = kernels.w8a8_matmul(*on_device, out_dtype=torch.int32, kernel="triton").cpu()
    assert acc.dtype == torch.int32 and torch.equal(acc, acc_ref), \
        f"int32 accumulators differ at {int((acc != acc_ref).sum())} entries"
    ref = torch_w8a8_matmul(*args)
    out = kernels.w8a8_matmul(*on_device, kernel="triton").cpu()
    assert out.shape == (m, n) and out.dtype == torch.float32
    rel = ((out - ref).abs() / ref.abs().clamp_min(1e-12)).max().item()
    assert rel <= 1e-5, f"max relative diff {rel:.3e}, max |diff| {(out - ref).abs().max().item():.3e}"
    if zero_rows:
        assert torch.equal(out[0], torch.zeros(n))


def test_triton_half_precision_output():
    args = make_case(4, 40, 64, seed=7)
    ref = torch_w8a8_matmul(*args)
    out = kernels.w8a8_matmul(*[t.to(DEVICE) for t in args], out_dtype=torch.float16, kernel="triton").cpu()
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, rtol=1e-3, atol=1e-3)


def test_w8a8_linear_runs_the_triton_kernel():
    """The packed SmoothQuant module with kernel='triton' matches its torch-kernel twin."""
    from tasks.quantize.execution import W8A8Linear
    from tasks.quantize.smoothquant import SmoothQuantConfig, smoothquant_layer

    gen = torch.Generator().manual_seed(3)
    w, x, bias = torch.randn(37, 96, generator=gen), torch.randn(1, 5, 96, generator=gen), torch.randn(37, generator=gen)
    layer = smoothquant_layer(w, x[0], 1, SmoothQuantConfig(name="sq", method="smoothquant"))
    device = torch.device(DEVICE)
    ref = W8A8Linear(layer, bias, torch.device("cpu"), "torch", "per_token")
    tri = W8A8Linear(layer, bias.to(device), device, "triton", "per_token")
    with torch.no_grad():
        want, got = ref(x), tri(x.to(device)).cpu()
    assert tri.engine == "triton" and got.shape == (1, 5, 37)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,k", [(1, 96), (5, 37), (9, 1100)])  # K past one 1024 sweep block
def test_triton_activation_codes_equal_reference(m, k):
    gen = torch.Generator().manual_seed(m * k)
    x = torch.randn(m, k, generator=gen) * 3
    x[0, :7] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.0, 0.25])  # exact ties at scale 1 below
    x[0, 7] = 127.0  # row 0's scale is exactly 1, so its ties are rounded as they stand
    if m > 2:
        x[2] = 0.0  # an all-zero row keeps scale 1 and codes 0
    ref_q, ref_s = quantize_activations(x, "per_token")
    q, s = kernels.quantize_activations(x.to(DEVICE), "per_token", kernel="triton")
    assert torch.equal(s.cpu(), ref_s), f"max scale diff {(s.cpu() - ref_s).abs().max().item():.3e}"
    assert torch.equal(q.cpu(), ref_q), f"{int((q.cpu() != ref_q).sum())} codes differ"
