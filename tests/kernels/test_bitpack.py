"""pack_bits / unpack_bits (kernels/bitpack.py): the dense 2/3-bit layout and its round trips."""

import pytest
import torch

from kernels.bitpack import pack_bits, packed_width, unpack_bits

AWKWARD_K = [1, 3, 7, 8, 9, 96, 781]


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("k", AWKWARD_K)
def test_unpack_inverts_pack_for_every_code_and_awkward_k(bits, k):
    gen = torch.Generator().manual_seed(bits * 1000 + k)
    rows = [torch.full((k,), v, dtype=torch.uint8) for v in range(2**bits)]  # every code value in every slot
    rows += [torch.randint(0, 2**bits, (k,), generator=gen, dtype=torch.uint8) for _ in range(5)]
    q = torch.stack(rows)  # (2^b + 5, K)
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (q.shape[0], packed_width(k, bits))
    assert torch.equal(unpack_bits(packed, bits, k), q)


def test_widths_shrink_with_the_bit_width():
    assert [packed_width(k, 2) for k in AWKWARD_K] == [1, 1, 2, 2, 3, 24, 196]  # ceil(K/4)
    assert [packed_width(k, 3) for k in AWKWARD_K] == [3, 3, 3, 3, 6, 36, 294]  # 3·ceil(K/8)


def test_two_bit_layout_is_four_codes_per_byte_low_bits_first():
    q = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)
    assert pack_bits(q, 2).tolist() == [[1 | 2 << 2 | 3 << 4 | 0 << 6, 3]]  # K padded to 8 with zero codes
    every = torch.arange(256).reshape(256, 1)
    codes = ((every >> torch.arange(0, 8, 2)) & 3).to(torch.uint8)  # (256, 4): the codes of each byte value
    assert torch.equal(pack_bits(codes, 2).flatten(), torch.arange(256, dtype=torch.uint8))  # each byte once


def test_three_bit_layout_is_a_little_endian_bit_stream():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 8, (4, 21), generator=gen, dtype=torch.uint8)
    packed = pack_bits(q, 3)
    stream = torch.zeros(4, 8 * packed.shape[1], dtype=torch.uint8)  # (N, bits), stream bit i = byte i//8, bit i%8
    for b in range(3):
        stream[:, b::3][:, :21] = (q >> b) & 1  # code k occupies stream bits 3k, 3k+1, 3k+2
    want = (stream.reshape(4, -1, 8).long() << torch.arange(8)).sum(-1).to(torch.uint8)
    assert torch.equal(packed, want)


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_bits(torch.full((2, 4), 4, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="bits must be one of 2, 3"):
        pack_bits(torch.zeros(2, 4, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="uint8 codes"):
        pack_bits(torch.zeros(2, 4, dtype=torch.int8), 3)
    with pytest.raises(ValueError, match=r"\(N, 6\) for K=9"):
        unpack_bits(torch.zeros(2, 3, dtype=torch.uint8), 3, 9)
