"""Triton fused task-vector merge: trim, DARE drop and rescale, TIES election, in one pass.

Same signature and semantics as ``kernels.merge.torch_task_vector_merge`` (the spec):
θ₀ + λ·combine(τ̂_1, …, τ̂_K) with τ̂_k = DARE(trim(τ_k)) and combine the TIES disjoint mean
(Yadav et al., NeurIPS 2023) or the plain sum (task arithmetic, DARE of Yu et al., ICML 2024).
Memory-bound elementwise work, in the spirit of the Triton tutorials' fused dropout (whose
``tl.rand(seed, offset)`` mask needs no stored mask either).

Each program owns BLOCK consecutive flat entries. It loads the (K_POW2, BLOCK) tile of all K
deltas once (rows past K masked to 0), trims it against the (K,) thresholds, draws the DARE
uniforms (``counter_uniform``: a word of ``tl.randint4x(seed_k, (offset + i) // 4)``) for the
whole tile (no memory traffic), and rescales
survivors. The mass Σ_k τ̂_k, the elected sign, the agreeing sum and count then run over
k = 0…K−1 in order, each row taken from the tile in registers by a masked sum over the task
axis (exact: one value plus zeros), so the float32 operations match the reference's order bit
for bit. The mean is an IEEE division (``div_rn``), and mul/add are not fused into FMAs
(``enable_fp_fusion=False``). K is a constexpr: one compile per number of tasks.
Memory traffic per call: reads K·n delta entries and n entries of w0, writes n outputs.

This module imports Triton at import time on purpose; ``kernels/merge.py`` imports it only
when the Triton path is chosen. Under ``TRITON_INTERPRET=1`` (set before this module is first
imported) the kernel runs on CPU tensors through Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.merge import check_merge_args, survivor_scale


@triton.jit
def _row(tile, kk, k: tl.constexpr):
    """Row k of a (K_POW2, BLOCK) tile, exactly: the masked sum adds only zeros to it."""
    return tl.sum(tl.where(kk[:, None] == k, tile, 0.0), axis=0)


@triton.jit
def counter_uniform(seed, index):
    """``kernels.merge.philox_uniform`` of flat ``index`` (int64): word index mod 4 of
    Philox-4x32-10 at counter index // 4, as a float32 uniform in [0, 1)."""
    r0, r1, r2, r3 = tl.randint4x(seed, index // 4)
    lane = index % 4
    word = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return tl.uint_to_uniform_float(word)


@triton.jit
def _sign(x):
    return (x > 0).to(tl.float32) - (x < 0).to(tl.float32)


@triton.jit
def _merge_kernel(
    w0_ptr, d_ptr, thr_ptr, seed_ptr, out_ptr,
    n, offset, lam, drop, scale,
    K: tl.constexpr, K_POW2: tl.constexpr, BLOCK: tl.constexpr,
    TRIM: tl.constexpr, DARE: tl.constexpr, RESCALE: tl.constexpr, ELECT: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (B,) flat entry
    mask = idx < n
    kk = tl.arange(0, K_POW2)  # (KP,) task
    mask_k = kk < K
    tile_mask = mask_k[:, None] & mask[None, :]
    tau = tl.load(d_ptr + kk.to(tl.int64)[:, None] * n + idx[None, :], mask=tile_mask,
                  other=0.0).to(tl.float32)  # (KP, B), each delta entry read once
    if TRIM:
        thr = tl.load(thr_ptr + kk, mask=mask_k, other=0.0)  # (KP,)
        tau = tl.where(tl.abs(tau) >= thr[:, None], tau, 0.0)
    if DARE:
        seeds = tl.load(seed_ptr + kk, mask=mask_k, other=0)  # (KP,) int64
        u = counter_uniform(seeds[:, None], (idx + offset)[None, :])  # (KP, B), from the flat index
        tau = tl.where(u >= drop, tau * scale, 0.0)
    elif RESCALE:
        tau = tau * scale
    if ELECT:
        mass = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in tl.static_range(K):
            mass += _row(tau, kk, k)
        sign = _sign(mass)
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        count = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in tl.static_range(K):
            t = _row(tau, kk, k)
            agree = (_sign(t) == sign) & (t != 0)
            total += tl.where(agree, t, 0.0)
            count += agree.to(tl.float32)
        combined = tl.where(count > 0, tl.math.div_rn(total, tl.maximum(count, 1.0)), 0.0)
    else:
        combined = _row(tau, kk, 0)
        for k in tl.static_range(1, K):
            combined += _row(tau, kk, k)
    w0 = tl.load(w0_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + idx, (w0 + lam * combined).to(out_ptr.dtype.element_ty), mask=mask)


def triton_task_vector_merge(w0: Tensor, deltas: Tensor, lam: float, thresholds: Tensor | None = None,
                             drop: float = 0.0, seeds: Tensor | None = None, rescale: float | None = None,
                             elect: bool = False, offset: int = 0) -> Tensor:
    """Triton fused merge: w0 any shape, deltas (K, *w0.shape) -> w0's shape in the promoted dtype."""
    check_merge_args(w0, deltas, thresholds, drop, seeds, rescale)
    k = deltas.shape[0]
    out = torch.empty(w0.shape, dtype=torch.promote_types(w0.dtype, deltas.dtype), device=w0.device)
    n = w0.numel()
    if n == 0:
        return out
    w0, deltas = w0.contiguous(), deltas.contiguous()
    thr = thresholds.to(device=w0.device, dtype=torch.float32).contiguous() if thresholds is not None else w0
    seed = seeds.to(w0.device).contiguous() if drop > 0 else w0  # unused pointer when not DARE
    k_pow2 = triton.next_power_of_2(k)
    block = max(128, min(1024, 4096 // k_pow2))
    _merge_kernel[(triton.cdiv(n, block),)](
        w0, deltas, thr, seed, out,
        n, offset, float(lam), float(drop), survivor_scale(drop, rescale),
        K=k, K_POW2=k_pow2, BLOCK=block,
        TRIM=thresholds is not None, DARE=drop > 0, RESCALE=rescale is not None, ELECT=elect,
        enable_fp_fusion=False,
    )
    return out
