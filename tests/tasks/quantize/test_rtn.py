"""RTN uniform quantizer (tasks/quantize/rtn.py): METHODS.md §5 `rtn` properties."""

import pydantic
import pytest
import torch

from tasks.quantize import METHODS, get_method
from tasks.quantize.rtn import RtnConfig, code_range, dequantize, fake_quantize, quantize_weight

CASES = [
    {"bits": b, "granularity": gr, "symmetric": sym, "group_size": 16}
    for b in (2, 3, 4, 8) for gr in ("tensor", "channel", "group") for sym in (True, False)
]


def weight(seed: int, n: int = 12, k: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)  # rows of different ranges
    w[0] += 0.5  # an all-positive-ish row: exercises widening the asymmetric range to include 0
    w[1, :16] = 0.0  # an all-zero group
    return w


def ids(case):
    return f"w{case['bits']}-{case['granularity']}-{'sym' if case['symmetric'] else 'asym'}"


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_error_within_half_step(case):
    cfg = RtnConfig(name="t", **case)
    w = weight(1)
    qw = quantize_weight(w, cfg)
    s = qw.scales.repeat_interleave(qw.group_size, dim=1)  # (N, K)
    err = (w - dequantize(qw)).abs()
    qmin, qmax = code_range(cfg.bits, cfg.symmetric)
    clipped = (qw.codes.float() == qmin) | (qw.codes.float() == qmax)
    assert (err <= s / 2 + 1e-6)[~clipped].all(), f"max err/s {(err / s).max():.3f}"
    assert (err <= s + 1e-6).all()  # asymmetric ranges may clip by at most one step
    if cfg.symmetric:
        assert (err <= s / 2 + 1e-6).all()  # symmetric never clips
    assert qw.codes.dtype == (torch.int8 if cfg.symmetric else torch.uint8)
    assert torch.equal(dequantize(qw)[1, :16], torch.zeros(16))  # zeros stay exactly zero


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_at_most_2_pow_b_codes_per_group_and_in_range(case):
    cfg = RtnConfig(name="t", **case)
    qw = quantize_weight(weight(2), cfg)
    qmin, qmax = code_range(cfg.bits, cfg.symmetric)
    assert int(qw.codes.min()) >= qmin and int(qw.codes.max()) <= qmax
    n, k = qw.shape
    groups = qw.codes.reshape(n, k // qw.group_size, qw.group_size)
    for row in groups.reshape(-1, qw.group_size):
        assert row.unique().numel() <= 2**cfg.bits
    if cfg.granularity == "tensor":
        assert qw.scales.unique().numel() == 1


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_idempotent(case):
    cfg = RtnConfig(name="t", **case)
    w1 = fake_quantize(weight(3), cfg)
    w2 = fake_quantize(w1, cfg)
    torch.testing.assert_close(w2, w1, rtol=0, atol=1e-6)
    assert torch.equal(quantize_weight(w1, cfg).codes, quantize_weight(w2, cfg).codes)


def test_symmetric_and_asymmetric_grids():
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.25, 2.0, 1.0, 0.5, 0.125]])
    sym = quantize_weight(w, RtnConfig(name="s", bits=4))
    assert sym.zeros is None and sym.scales.item() == pytest.approx(2.0 / 7)
    assert sym.codes[0, 4].item() == 7 and sym.codes[0, 2].item() == 0
    asym = quantize_weight(w, RtnConfig(name="a", bits=4, symmetric=False))
    s = 3.0 / 15
    assert asym.scales.item() == pytest.approx(s) and asym.zeros.item() == round(1.0 / s)
    assert asym.codes[0, 0].item() == 0 and asym.codes[0, 4].item() == 15
    assert dequantize(asym)[0, 2].item() == 0.0  # 0 is exactly representable
    pos = quantize_weight(torch.tensor([[1.0, 2.0]]), RtnConfig(name="p", bits=8, symmetric=False))
    assert pos.zeros.item() == 0  # range widened to include 0
    # asymmetric uses the range better than symmetric on a one-sided weight
    one_sided = torch.rand(8, 64, generator=torch.Generator().manual_seed(0))
    err = {sym_: (fake_quantize(one_sided, RtnConfig(name="x", bits=3, symmetric=sym_)) - one_sided).pow(2).mean()
           for sym_ in (True, False)}
    assert err[False] < err[True]


def test_group_granularity_needs_divisor():
    with pytest.raises(ValueError, match="does not divide in_features 40"):
        quantize_weight(torch.randn(3, 40), RtnConfig(name="g", bits=4, granularity="group", group_size=32))


@pytest.mark.parametrize("g", [8, 24, 48])
def test_config_rejects_bad_group_size(g):
    with pytest.raises(pydantic.ValidationError, match="power of two >= 16"):
        RtnConfig(name="g", bits=4, granularity="group", group_size=g)
    RtnConfig(name="c", bits=4, granularity="channel", group_size=g)  # only matters for groups


def test_config_is_strict():
    with pytest.raises(pydantic.ValidationError):
        RtnConfig(name="x", bits=5)
    with pytest.raises(pydantic.ValidationError):
        RtnConfig(name="x", bits=4, bogus=1)


def test_registry():
    assert {"rtn", "gptq", "awq", "smoothquant"} <= set(METHODS) and get_method("rtn").config is RtnConfig
    with pytest.raises(ValueError, match="quantize.method: 'gptqq' is not one of rtn, gptq, awq"):
        get_method("gptqq")
