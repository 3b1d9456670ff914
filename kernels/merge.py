"""Fused task-vector merge: θ₀ + λ·combine(sparsify(τ_1), …, sparsify(τ_K)) in one pass.

The torch reference (``torch_task_vector_merge``, the spec) of the merges in ``tasks.merge``:
task arithmetic (Ilharco et al., ICLR 2023) sums the τ_k; TIES (Yadav et al., NeurIPS 2023)
trims each τ_k at a threshold (``|τ| >= t`` keeps, as ``tasks.merge.ties.trim``), elects
γ = sgn(Σ_k τ̂_k) and takes the disjoint mean of the nonzero τ̂_k with sign γ; DARE (Yu et al.,
ICML 2024) keeps each entry with probability 1 − p and divides survivors by 1 − p, or by
DAREx-q's q (``rescale``). ``kernels.triton_merge.triton_task_vector_merge`` computes the same
with the same signature, reading each delta entry once.

The DARE keep mask is counter based, so a GPU kernel reproduces it and a block of a tensor
draws the same bits as the whole: entry i of task k is kept when u ≥ p, u is word i mod 4
of ``tl.randint4x(seed_k, i // 4)`` (Philox-4x32-10 keyed by the 64-bit seed split lo/hi,
counter (lo32(i // 4), hi32(i // 4), 0, 0)) through Triton's ``uint_to_uniform_float`` (as
int32, negatives bit-flipped, times 4.6566127342e-10 in float32), i = offset + the entry's
index. ``philox_uniform`` is that function in torch, bit for bit, one Philox evaluation per
four indices; ``offset`` is the flat
index of the first entry of ``w0`` in the whole tensor (a streamed merge passes its block's).

Arithmetic is float32 in a fixed order, so the reference and the kernel agree bit for bit:
survivors are τ · fl32(1/factor); the mass and the sums run over k = 0…K−1 in order; the mean is
an IEEE division total / count; the output is fl(w0 + fl(λ·combined)) cast to the promoted dtype
of w0 and the deltas.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.dispatch import Kernel, resolve_kernel

_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_ROUNDS = 10  # triton.language.random.N_ROUNDS_DEFAULT
_UINT_TO_UNIFORM = 4.6566127342e-10  # triton's scale: largest with (2³¹ − 1)·scale < 1 in float32
_M32 = 0xFFFFFFFF
_CHUNK = 1 << 16  # Philox counters per chunk (4 indices each): fastest measured here (2^12: 3x slower)


def _mul32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit words of a·b for a uint32 constant and a uint32-valued int64 tensor.

    The product is below 2⁶⁴, so the int64 multiply, which wraps modulo 2⁶⁴, holds all of its
    bits: lo is the low word as it stands, and the arithmetic shift's sign fill is masked off hi."""
    p = b * a
    return (p >> 32) & _M32, p & _M32


def _philox_words(seed: int, counters: Tensor) -> Tensor:
    """The four 32-bit output words (as int64) of Philox-4x32-10 at counters (lo32(c), hi32(c),
    0, 0) keyed by ``seed``: (len(counters), 4), what ``tl.randint4x(seed, c)`` returns."""
    c0, c1 = counters & _M32, (counters >> 32) & _M32  # int64 holding uint32 words
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mul32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return torch.stack((c0, c1, c2, c3), dim=1)


def _to_uniform(words: Tensor) -> Tensor:
    """Triton's ``uint_to_uniform_float`` of uint32-valued int64 words: float32 in [0, 1)."""
    x = torch.where(words >= 1 << 31, words - (1 << 32), words)  # bitcast to int32
    x = torch.where(x < 0, -x - 1, x)  # ~x
    return x.to(torch.float32) * torch.tensor(_UINT_TO_UNIFORM, dtype=torch.float32)


def philox_uniform(seed: int, start: int, n: int, device: torch.device | str = "cpu") -> Tensor:
    """The uniforms of flat indices start … start + n − 1: index i gets word i mod 4 of
    ``tl.randint4x(seed, i // 4)`` through ``tl.uint_to_uniform_float``, bit for bit.

    One Philox evaluation serves four consecutive indices: the torch reference draws a mask
    4x faster than with one ``tl.rand`` per index; the kernel picks each lane's word."""
    if not 0 <= seed < 1 << 63:
        raise ValueError(f"philox_uniform: seed must lie in [0, 2**63), got {seed}")
    if start < 0 or n < 0:
        raise ValueError(f"philox_uniform: start and n must be non-negative, got {start}, {n}")
    out = torch.empty(n, dtype=torch.float32, device=device)
    end = (start + n + 3) // 4  # one past the last counter
    for c in range(start // 4, end, _CHUNK):
        counters = torch.arange(c, min(c + _CHUNK, end), dtype=torch.int64, device=device)
        u = _to_uniform(_philox_words(seed, counters)).reshape(-1)  # indices 4c … 4(c + len) − 1
        lo, hi = max(start, 4 * c), min(start + n, 4 * (c + len(counters)))
        out[lo - start:hi - start] = u[lo - 4 * c:hi - 4 * c]
    return out


def check_merge_args(w0: Tensor, deltas: Tensor, thresholds: Tensor | None, drop: float,
                     seeds: Tensor | None, rescale: float | None) -> None:
    """Shapes, dtypes and ranges shared by the reference and the Triton kernel."""
    if not w0.is_floating_point() or not deltas.is_floating_point():
        raise ValueError(f"task_vector_merge: w0 and deltas must be float, got {w0.dtype} and {deltas.dtype}")
    if deltas.dim() < 1 or deltas.shape[0] < 1 or tuple(deltas.shape[1:]) != tuple(w0.shape):
        raise ValueError(f"task_vector_merge: deltas must have shape (K, *w0.shape) = (K, {', '.join(map(str, w0.shape))})"
                         f" with K >= 1, got {tuple(deltas.shape)}")
    k = deltas.shape[0]
    if thresholds is not None and tuple(thresholds.shape) != (k,):
        raise ValueError(f"task_vector_merge: thresholds must have shape ({k},), got {tuple(thresholds.shape)}")
    if not 0 <= drop < 1:
        raise ValueError(f"task_vector_merge: drop probability must lie in [0, 1), got {drop}")
    if drop > 0 and (seeds is None or tuple(seeds.shape) != (k,) or seeds.dtype != torch.int64):
        raise ValueError(f"task_vector_merge: drop > 0 needs seeds, an int64 tensor of shape ({k},)")
    if drop > 0 and bool((seeds < 0).any()):
        raise ValueError("task_vector_merge: seeds must be non-negative")
    if rescale is not None and rescale <= 0:
        raise ValueError(f"task_vector_merge: DAREx-q's q must be positive, got {rescale}")


def survivor_scale(drop: float, rescale: float | None) -> float:
    """The factor DARE multiplies survivors by: 1/(1 − p), or 1/q; used as float32."""
    return 1.0 / (rescale if rescale is not None else 1.0 - drop)


def dare_keep(shape: tuple[int, ...] | torch.Size, drop: float, seed: int, offset: int = 0,
              device: torch.device | str = "cpu") -> Tensor:
    """DARE's keep mask of a tensor whose first entry has flat index ``offset``: entry i is kept
    when its uniform (``philox_uniform``) is >= p, compared in float32: with probability 1 − p."""
    u = philox_uniform(seed, offset, int(torch.Size(shape).numel()), device).reshape(shape)
    return u >= torch.tensor(drop, dtype=torch.float32, device=device)


def _sparsified(delta: Tensor, k: int, thresholds: Tensor | None, drop: float, seeds: Tensor | None,
                scale: Tensor, offset: int) -> Tensor:
    """τ̂_k in float32: trimmed at its threshold, then DARE-dropped and rescaled."""
    d = delta.float()
    if thresholds is not None:
        d = torch.where(d.abs() >= thresholds[k].float(), d, 0.0)
    if drop > 0:
        d = torch.where(dare_keep(d.shape, drop, int(seeds[k]), offset, d.device), d * scale, 0.0)
    elif scale != 1:
        d = d * scale
    return d


def disjoint_mean(deltas: list[Tensor]) -> Tensor:
    """Elect γ = sgn(Σ_k τ_k) and average, per entry, the τ_k that are nonzero with sign γ.

    Accumulated task by task, entry-wise, so the result of a block of rows equals those rows of
    the whole tensor's result bit for bit (a streamed merge reads blocks) and the temporaries
    are a few tensors, not K stacked copies."""
    mass = torch.zeros_like(deltas[0])
    for d in deltas:
        mass += d
    sign = torch.sign(mass)
    total, count = torch.zeros_like(mass), torch.zeros_like(mass)
    for d in deltas:
        agree = (torch.sign(d) == sign) & (d != 0)
        total += torch.where(agree, d, 0.0)
        count += agree
    return torch.where(count > 0, total / count.clamp(min=1), 0.0)


def torch_task_vector_merge(w0: Tensor, deltas: Tensor, lam: float, thresholds: Tensor | None = None,
                            drop: float = 0.0, seeds: Tensor | None = None, rescale: float | None = None,
                            elect: bool = False, offset: int = 0) -> Tensor:
    """θ₀ + λ·combine(τ̂_1, …, τ̂_K): the reference, in float32 task by task.

    w0 any shape float; deltas (K, *w0.shape) float; thresholds (K,) trim thresholds or None;
    drop p ∈ [0, 1) with seeds (K,) int64 (DARE); rescale DAREx-q's q (survivors / q, also with
    p = 0); elect: TIES sign election and disjoint mean, else the plain sum; offset: flat index
    of w0's first entry in the whole tensor (the DARE counters). Returns w0's shape in
    ``torch.promote_types(w0.dtype, deltas.dtype)``."""
    check_merge_args(w0, deltas, thresholds, drop, seeds, rescale)
    scale = torch.tensor(survivor_scale(drop, rescale), dtype=torch.float32)
    taus = [_sparsified(deltas[k], k, thresholds, drop, seeds, scale, offset) for k in range(deltas.shape[0])]
    if elect:
        combined = disjoint_mean(taus)
    else:
        combined = taus[0]
        for t in taus[1:]:
            combined = combined + t
    lam32 = torch.tensor(lam, dtype=torch.float32)
    return (w0.float() + lam32 * combined).to(torch.promote_types(w0.dtype, deltas.dtype))


def task_vector_merge(w0: Tensor, deltas: Tensor, lam: float, thresholds: Tensor | None = None,
                      drop: float = 0.0, seeds: Tensor | None = None, rescale: float | None = None,
                      elect: bool = False, offset: int = 0, kernel: Kernel = "auto") -> Tensor:
    """``torch_task_vector_merge`` or its Triton kernel, chosen by ``kernel`` for w0's device."""
    if resolve_kernel(kernel, w0.device) == "triton":
        from kernels.triton_merge import triton_task_vector_merge  # lazy: imports triton

        return triton_task_vector_merge(w0, deltas, lam, thresholds, drop, seeds, rescale, elect, offset)
    return torch_task_vector_merge(w0, deltas, lam, thresholds, drop, seeds, rescale, elect, offset)
