"""The Triton W4A16 kernel against the torch reference, on CPU through TRITON_INTERPRET=1."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest
import torch

pytest.importorskip("triton")

import kernels
from kernels.int4 import pack_int4, torch_w4a16_matmul
from kernels.triton_int4 import W4A16Config, heuristic_config, triton_w4a16_matmul

if os.environ["TRITON_INTERPRET"] != "1" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is set to something other than 1 and there is no GPU", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref.double() - out.double()).pow(2).sum().clamp_min(1e-300)
    return 10 * torch.log10(ref.double().pow(2).sum() / noise).item()


def make_case(m, n, k, g, seed, zero_group=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    groups = -(-k // g)
    s = torch.rand(n, groups, generator=gen) * 0.1 + 0.01
    z = torch.randint(0, 16, (n, groups), generator=gen).float()
    if zero_group:  # an all-zero group: codes equal the zero-point, and a zero scale
        q[:, :g] = 8
        z[:, 0] = 8
        s[: n // 2, 0] = 0.0
    x = torch.randn(m, k, generator=gen)
    return x, pack_int4(q), s, z


@pytest.mark.parametrize("m,n,k,g,zero_group", [
    (1, 37, 96, 32, False),   # decode row, awkward N, K = 1.5 blocks
    (5, 37, 96, 32, True),    # all-zero first group
    (5, 23, 70, 16, False),   # K not a multiple of the group or the block: partial last group
    (18, 65, 160, 32, False),  # M and N just past a tile
])
def test_triton_matches_reference(m, n, k, g, zero_group):
    x, packed, s, z = make_case(m, n, k, g, seed=m * 1000 + n, zero_group=zero_group)
    ref = torch_w4a16_matmul(x, packed, s, z, g)  # (M, N)
    args = [t.to(DEVICE) for t in (x, packed, s, z)]
    out = kernels.w4a16_matmul(*args, g, kernel="triton").cpu()
    assert out.shape == (m, n) and out.dtype == x.dtype
    diff = (out - ref).abs().max().item()
    assert sqnr_db(ref, out) >= 40, f"SQNR {sqnr_db(ref, out):.1f} dB, max |diff| {diff:.3e}"
    if zero_group:
        x0 = torch.zeros_like(x)
        x0[:, :g] = x[:, :g]  # only the all-zero group is active
        out0 = kernels.w4a16_matmul(x0.to(DEVICE), *args[1:], g, kernel="triton").cpu()
        assert torch.equal(out0, torch.zeros_like(out0)), f"max |out| {out0.abs().max().item():.3e}"


def test_triton_half_precision_activations():
    x, packed, s, z = make_case(3, 40, 64, 32, seed=7)
    ref = torch_w4a16_matmul(x, packed, s, z, 32)
    out = kernels.w4a16_matmul(x.half().to(DEVICE), packed.to(DEVICE), s.half().to(DEVICE), z.half().to(DEVICE),
                               32, kernel="triton").cpu()
    assert out.dtype == torch.float16
    diff = (out.float() - ref).abs().max().item()
    assert sqnr_db(ref, out.float()) >= 40, f"SQNR {sqnr_db(ref, out.float()):.1f} dB, max |diff| {diff:.3e}"


@pytest.mark.parametrize("cfg", [
    W4A16Config(16, 32, 32, 1),  # one group per K step, no split
    W4A16Config(16, 32, 32, 3),  # K split in three slices summed by atomics (96 = 3 steps)
    W4A16Config(16, 32, 64, 2),  # K steps spanning two groups: the per-element scale gather
])
@pytest.mark.parametrize("m,n,k,g", [(1, 37, 96, 32), (18, 65, 160, 32)])
def test_triton_configs_match_reference(cfg, m, n, k, g):
    """Every branch of the kernel (split-K atomics, group-aligned and straddling K steps) agrees."""
    x, packed, s, z = make_case(m, n, k, g, seed=k + cfg.split_k)
    ref = torch_w4a16_matmul(x, packed, s, z, g)
    out = triton_w4a16_matmul(*[t.to(DEVICE) for t in (x, packed, s, z)], g, config=cfg).cpu()
    diff = (out - ref).abs().max().item()
    assert sqnr_db(ref, out) >= 40, f"SQNR {sqnr_db(ref, out):.1f} dB, max |diff| {diff:.3e}"


def test_heuristic_splits_k_only_at_decode_sizes():
    """4096×4096 at batch 1 has 64 output tiles: K is split to fill the GPU; batch 256 is not split."""
    decode = heuristic_config(1, 4096, 4096, 128)
    assert decode.block_k == 128 and decode.split_k > 1
    assert decode.split_k * 4096 // decode.block_n >= 132  # at least one program per H100 SM
    assert heuristic_config(256, 4096, 4096, 128).split_k == 1
