"""pack_int4 / unpack_int4 and the torch W4A16 reference (kernels/int4.py)."""

import pytest
import torch

import kernels
from kernels.int4 import dequantize_int4, pack_int4, torch_w4a16_matmul, unpack_int4


def test_pack_unpack_round_trips_all_16_nibbles():
    lo, hi = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    q = torch.stack((lo.flatten(), hi.flatten()), dim=1).reshape(4, 128).to(torch.uint8)  # every (even, odd) pair
    packed = pack_int4(q)
    assert packed.shape == (4, 64) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    assert torch.equal(packed & 0xF, q[:, 0::2])  # documented layout: low nibble = even column
    assert torch.equal(packed >> 4, q[:, 1::2])
    assert torch.equal(torch.sort(packed.flatten()).values, torch.arange(256, dtype=torch.uint8))  # each byte once


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match="K even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.full((2, 4), 16, dtype=torch.uint8))


@pytest.mark.parametrize("m,n,k,g", [(1, 37, 96, 32), (5, 16, 64, 64), (3, 7, 40, 16)])
def test_reference_equals_explicit_dequantize_matmul(m, n, k, g):
    gen = torch.Generator().manual_seed(n * k + m)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    groups = -(-k // g)  # a partial last group when g does not divide K
    s = torch.rand(n, groups, generator=gen) + 0.05
    z = torch.randint(0, 16, (n, groups), generator=gen).float()
    x = torch.randn(m, k, generator=gen)
    w = torch.empty(n, k)
    for j in range(k):  # explicit, column by column: w[n, j] = s[n, j//g] * (q[n, j] - z[n, j//g])
        w[:, j] = s[:, j // g] * (q[:, j].float() - z[:, j // g])
    packed = pack_int4(q)
    torch.testing.assert_close(dequantize_int4(packed, s, z, g), w)
    if k % g == 0:  # the in-place form, written into a buffer with stale contents
        out = torch.full((n, k), float("nan"))
        assert dequantize_int4(packed, s, z, g, out=out) is out
        torch.testing.assert_close(out, w)
    torch.testing.assert_close(torch_w4a16_matmul(x, packed, s, z, g), x @ w.t())
    torch.testing.assert_close(kernels.w4a16_matmul(x, packed, s, z, g, kernel="torch"), x @ w.t())


def test_reference_checks_shapes():
    packed = torch.zeros(4, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="ceil"):
        torch_w4a16_matmul(torch.zeros(2, 32), packed, torch.ones(4, 2), torch.zeros(4, 1), 16)
    with pytest.raises(ValueError, match="K=31"):
        torch_w4a16_matmul(torch.zeros(2, 31), packed, torch.ones(4, 2), torch.zeros(4, 2), 16)


def test_resolve_kernel(monkeypatch):
    assert kernels.resolve_kernel("torch", "cpu") == "torch"
    assert kernels.resolve_kernel("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="not one of auto, torch, triton"):
        kernels.resolve_kernel("cuda", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if kernels.triton_available():
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            kernels.resolve_kernel("triton", "cpu")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert kernels.resolve_kernel("triton", "cpu") == "triton"
        assert kernels.resolve_kernel("auto", "cuda") == "triton"
    else:
        with pytest.raises(ValueError, match="not installed"):
            kernels.resolve_kernel("triton", "cpu")


def test_importing_kernels_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, kernels, kernels.cpu, kernels.int4; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_offload_device(monkeypatch):
    """Host tensors go to the GPU only when the setting allows Triton and a GPU and Triton exist."""
    from kernels.dispatch import offload_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert offload_device("auto", "cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("kernels.dispatch.triton_available", lambda: True)
    assert offload_device("auto", "cpu") == torch.device("cuda")
    assert offload_device("triton", "cpu") == torch.device("cuda")
    assert offload_device("torch", "cpu") == torch.device("cpu")
    monkeypatch.setattr("kernels.dispatch.triton_available", lambda: False)
    assert offload_device("auto", "cpu") == torch.device("cpu")
