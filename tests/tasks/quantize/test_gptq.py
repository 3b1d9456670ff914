"""GPTQ (tasks/quantize/gptq.py): METHODS.md §5 `gptq` properties on synthetic and trained layers."""

import pydantic
import pytest
import torch

from slimforge.models import MLPConfig
from tasks.quantize.adadim import output_error as layer_error
from tasks.quantize.gptq import GptqConfig, gptq_weight, hessian, quantize_gptq
from tasks.quantize.layerwise import layer_inputs, quantizable
from tasks.quantize.rtn import RtnConfig, code_range, dequantize, quantize_weight

GRIDS = [(b, gr, sym) for b in (4, 3) for gr in ("channel", "group") for sym in (True, False)]


def grid_id(grid) -> str:
    b, gr, sym = grid
    return f"w{b}-{gr}-{'sym' if sym else 'asym'}"


def gptq(grid, **kw) -> GptqConfig:
    b, gr, sym = grid
    return GptqConfig(name="g", method="gptq", bits=b, granularity=gr, group_size=16, symmetric=sym, **kw)


def rtn(grid) -> RtnConfig:
    b, gr, sym = grid
    return RtnConfig(name="r", bits=b, granularity=gr, group_size=16, symmetric=sym)


def orthogonal_inputs(m: int, k: int, col_scales: torch.Tensor, seed: int) -> torch.Tensor:
    """X (m, k) with orthogonal columns of the given norms: XᵀX = diag(col_scales²)."""
    q, _ = torch.linalg.qr(torch.randn(m, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * col_scales


def weight(seed: int, n: int = 24, k: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)).double()


def output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    """‖X Wᵀ − X Ŵᵀ‖_F / ‖X Wᵀ‖_F."""
    ref = x.double() @ w.double().t()
    return float((x.double() @ w_hat.double().t() - ref).norm() / ref.norm())


@pytest.mark.parametrize("grid", GRIDS, ids=grid_id)
def test_identity_hessian_is_rtn(grid):
    """XᵀX ∝ I: H⁻¹ is diagonal, no error propagates, GPTQ rounds like RTN."""
    w = weight(0)
    x = orthogonal_inputs(256, 64, torch.full((64,), 3.0, dtype=torch.float64), seed=1)
    qw = gptq_weight(w, hessian(x), gptq(grid))
    ref = quantize_weight(w, rtn(grid))
    assert torch.equal(qw.codes, ref.codes), f"{(qw.codes != ref.codes).sum()} codes differ from RTN"
    torch.testing.assert_close(qw.scales, ref.scales)


@pytest.mark.parametrize("static", [False, True])
def test_act_order_permutation_is_undone(static):
    """A diagonal H with distinct entries: act_order permutes the columns, nothing propagates,
    so the result must be RTN's in the original column order."""
    w = weight(2)
    col_scales = torch.linspace(0.5, 4.0, 64, dtype=torch.float64)[torch.randperm(64, generator=torch.Generator().manual_seed(3))]
    h = hessian(orthogonal_inputs(256, 64, col_scales, seed=4))
    grid = (4, "group" if static else "channel", True)
    qw = gptq_weight(w, h, gptq(grid, act_order=True, static_groups=static))
    assert torch.equal(qw.codes, quantize_weight(w, rtn(grid)).codes)


def test_act_order_with_dynamic_groups_is_refused():
    with pytest.raises(pydantic.ValidationError, match="act_order with granularity 'group' needs static_groups"):
        GptqConfig(name="g", method="gptq", bits=4, granularity="group", act_order=True)


@pytest.mark.parametrize("grid", [(4, "channel", True), (3, "channel", False), (4, "group", True)], ids=grid_id)
def test_lazy_batches_equal_column_by_column_updates(grid):
    """Lazy block updates reorder the same arithmetic: the block size does not change the codes."""
    w = weight(5, k=96)
    x = torch.randn(300, 96, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x[:, :8] += 2 * x[:, 8:16]  # correlated inputs, so errors do propagate
    h = hessian(x)
    static = grid[1] == "group"  # dynamic group grids follow the reference's block-dependent W snapshot
    codes = [gptq_weight(w, h, gptq(grid, block_size=b, static_groups=static)).codes for b in (1, 7, 32, 128)]
    assert all(torch.equal(c, codes[0]) for c in codes[1:])
    assert not torch.equal(codes[0], quantize_weight(w, rtn(grid)).codes)  # and they are not RTN's


def test_dead_inputs_get_zero_columns():
    w = weight(7)
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    x[:, [3, 40]] = 0
    qw = gptq_weight(w, hessian(x), gptq((4, "channel", False)))
    assert torch.equal(dequantize(qw)[:, [3, 40]], torch.zeros(24, 2))


@pytest.mark.parametrize("grid", GRIDS, ids=grid_id)
def test_codes_in_range(grid):
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    qw = gptq_weight(weight(10), hessian(x), gptq(grid))
    qmin, qmax = code_range(grid[0], grid[2])
    assert int(qw.codes.min()) >= qmin and int(qw.codes.max()) <= qmax
    assert qw.codes.dtype == (torch.int8 if grid[2] else torch.uint8)


@pytest.mark.parametrize("grid", [g for g in GRIDS if g[2]], ids=grid_id)
@pytest.mark.parametrize("arch", ["trained_mlp", "trained_cnn"])
def test_lower_layer_error_than_rtn_on_trained_layers(grid, arch, request, digits_split):
    """Each layer of a trained model, on its float inputs from 256 calibration images."""
    model = request.getfixturevalue(arch)
    calib = digits_split[0][:256]
    layers = quantizable(model, rtn(grid))
    assert layers
    for name, module in layers.items():
        x = layer_inputs(model, module, calib)
        w = module.weight.detach().reshape(module.weight.shape[0], -1)
        e_rtn = output_error(w, dequantize(quantize_weight(w, rtn(grid))), x)
        for cfg in (gptq(grid), gptq(grid, act_order=True, static_groups=True)):
            e = output_error(w, dequantize(gptq_weight(w, hessian(x), cfg)), x)
            assert e < e_rtn, f"{name} act_order={cfg.act_order}: GPTQ {e:.4f} vs RTN {e_rtn:.4f}"


def test_model_quantization_needs_calibration(trained_mlp):
    with pytest.raises(ValueError, match="'g' .method gptq. needs calibration inputs"):
        quantize_gptq(trained_mlp, None, gptq((4, "channel", True)))


def per_ic_error(w: torch.Tensor, qw, x: torch.Tensor) -> float:
    """output_error of a per-IC result, which holds Wᵀ's codes."""
    return output_error(w, dequantize(qw).t(), x)


@pytest.mark.parametrize("grid", [(3, "group", True), (4, "group", False), (3, "channel", True)], ids=grid_id)
def test_per_ic_gptq_beats_per_ic_rtn_on_trained_layers(grid, trained_mlp, digits_split):
    """AdaDim's pairing: GPTQ along the output axis (a grid per input column, fitted from the
    error-updated column) has lower layer output error than RTN on the same per-IC grid."""
    calib = digits_split[0][:256]
    for name, module in quantizable(trained_mlp, rtn(grid)).items():
        w = module.weight.detach()
        if w.shape[0] % 16:
            continue  # the head's 10 rows hold no group of 16
        x = layer_inputs(trained_mlp, module, calib)
        qw = gptq_weight(w, hessian(x), gptq(grid), axis="output")
        assert qw.shape == (w.shape[1], w.shape[0]) and tuple(qw.scales.shape[:1]) == (w.shape[1],)
        qmin, qmax = code_range(grid[0], grid[2])
        assert int(qw.codes.min()) >= qmin and int(qw.codes.max()) <= qmax
        e_rtn = per_ic_error(w, quantize_weight(w.t(), rtn(grid)), x)
        e = per_ic_error(w, qw, x)
        assert e < e_rtn, f"{name}: per-IC GPTQ {e:.4f} vs per-IC RTN {e_rtn:.4f}"


def test_per_ic_gptq_with_identity_hessian_is_per_ic_rtn():
    """With H = I there is no error to feed forward: each column is rounded on its own grid, as RTN of Wᵀ."""
    w = weight(3, n=32, k=40)
    for cfg in (gptq((4, "group", True)), gptq((3, "group", False), static_groups=True)):
        qw = gptq_weight(w, torch.eye(40, dtype=torch.float64), cfg, axis="output")
        ref = quantize_weight(w.t().float(), RtnConfig(name="r", bits=cfg.bits, granularity="group",
                                                     group_size=16, symmetric=cfg.symmetric))
        assert torch.equal(qw.codes, ref.codes) and torch.allclose(qw.scales, ref.scales)


def test_adaptive_gptq_keeps_the_axis_of_least_error(make_model):
    """method gptq, group_axis adaptive (AdaDim + GPTQ): each layer's result is whichever fixed-axis
    GPTQ gives the smaller calibration output error, an outlier input channel tipping it to per-IC."""
    model = make_model(MLPConfig(hidden=[64, 64]), (64,), 10, seed=1).eval()
    with torch.no_grad():
        model.backbone[1].weight[:, 5] *= 20  # outlier input channel
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(2))
    base = {"name": "g", "method": "gptq", "bits": 3, "granularity": "group", "group_size": 32}
    adaptive = quantize_gptq(model, x, GptqConfig(**base, group_axis="adaptive"))
    fixed = {axis: quantize_gptq(model, x, GptqConfig(**base, group_axis=axis)) for axis in ("input", "output")}
    assert adaptive["backbone.1"].group_axis == "output"
    assert adaptive["head"].group_axis == "input"  # 10 rows: no per-IC groups of 32
    inputs = layer_inputs(model, model.backbone[1], x)
    w = model.backbone[1].weight.detach()
    errors = {axis: layer_error(w, fixed[axis]["backbone.1"], inputs) for axis in fixed}
    assert errors["output"] < errors["input"], errors
    assert layer_error(w, adaptive["backbone.1"], inputs) == pytest.approx(min(errors.values()), rel=1e-6)
