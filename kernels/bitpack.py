"""Dense bit packing of 2-bit and 3-bit weight codes along K (the storage of sub-4-bit weights).

Each row of codes (N, K) becomes one little-endian bit stream: code ``k`` of row ``n``
occupies bits ``b·k … b·k + b − 1`` of that row's stream, and stream bit ``i`` is bit
``i % 8`` of byte ``i // 8`` (low bits first). Each row starts on a byte boundary; K is
zero-padded to a whole unit of codes, so a row takes ``packed_width(K, b)`` bytes:

- 2-bit: four codes per byte, ``packed[n, j] = q[n, 4j] | q[n, 4j+1] << 2 | q[n, 4j+2] << 4
  | q[n, 4j+3] << 6`` (the lowest index in the low bits, like ``pack_int4``'s nibbles);
  K padded to a multiple of 4, width ceil(K/4).
- 3-bit: eight codes in three bytes, ``word = Σ_i q[n, 8u+i] << 3i`` (24 bits) stored as
  bytes ``3u, 3u+1, 3u+2`` = bits 0–7, 8–15, 16–23 of ``word``; K padded to a multiple
  of 8, width 3·ceil(K/8).

The packed bytes do not record K: ``unpack_bits`` takes it (the loader reads it from the
model's weight shape) and checks the width against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

BITS = (2, 3)
_UNIT = {2: (4, 1), 3: (8, 3)}  # bits -> (codes, bytes) per unit of the stream


def _check_bits(fn: str, bits: int) -> tuple[int, int]:
    if bits not in _UNIT:
        raise ValueError(f"{fn}: bits must be one of {', '.join(map(str, BITS))}, got {bits}")
    return _UNIT[bits]


def packed_width(k: int, bits: int) -> int:
    """Bytes per row that ``pack_bits`` makes of K codes of ``bits`` bits."""
    codes, nbytes = _check_bits("packed_width", bits)
    return -(-k // codes) * nbytes


def pack_bits(q: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes in [0, 2^bits − 1], shape (N, K), into uint8 (N, packed_width(K, bits))."""
    codes, nbytes = _check_bits("pack_bits", bits)
    if q.dim() != 2 or q.dtype != torch.uint8:
        raise ValueError(f"pack_bits: expected uint8 codes of shape (N, K), got {q.dtype} {tuple(q.shape)}")
    if q.numel() and int(q.max()) >= 2**bits:
        raise ValueError(f"pack_bits: {bits}-bit codes must lie in [0, {2**bits - 1}], found {int(q.max())}")
    n, k = q.shape
    units = -(-k // codes)
    padded = q.new_zeros(n, units * codes)
    padded[:, :k] = q
    shifts = torch.arange(codes, device=q.device) * bits  # (codes,)
    words = (padded.reshape(n, units, codes).to(torch.int32) << shifts).sum(-1)  # (N, U): disjoint bit fields
    byte_shifts = torch.arange(nbytes, device=q.device) * 8  # (nbytes,)
    out = (words.unsqueeze(-1) >> byte_shifts) & 0xFF  # (N, U, nbytes), low byte first
    return out.reshape(n, units * nbytes).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of ``pack_bits``: uint8 (N, packed_width(K, bits)) -> uint8 codes (N, K)."""
    codes, nbytes = _check_bits("unpack_bits", bits)
    width = packed_width(k, bits)
    if packed.dim() != 2 or packed.dtype != torch.uint8 or packed.shape[1] != width:
        raise ValueError(f"unpack_bits: expected uint8 (N, {width}) for K={k} at {bits} bits, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    n, units = packed.shape[0], width // nbytes
    byte_shifts = torch.arange(nbytes, device=packed.device) * 8  # (nbytes,)
    words = (packed.reshape(n, units, nbytes).to(torch.int32) << byte_shifts).sum(-1)  # (N, U)
    shifts = torch.arange(codes, device=packed.device) * bits  # (codes,)
    q = (words.unsqueeze(-1) >> shifts) & (2**bits - 1)  # (N, U, codes)
    return q.reshape(n, units * codes)[:, :k].to(torch.uint8).contiguous()
