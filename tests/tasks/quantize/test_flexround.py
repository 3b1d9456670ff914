"""FlexRound (tasks/quantize/flexround.py): METHODS.md §5 `flexround` properties on synthetic and trained layers."""


import pytest
import torch
from torch import nn

from slimforge.config import ParamsError, validate_params
from tasks.quantize.flexround import (
    FlexRoundConfig,
    FlexRoundWeight,
    block_units,
    flexround_layer,
    quantize_flexround,
)
from tasks.quantize.layerwise import (
    layer_inputs,
    layer_output_errors,
    quantizable,
    quantize_rtn,
    taps,
    working_copy,
)
from tasks.quantize.rtn import code_range, dequantize, quantize_weight

GRIDS = [(b, gr, sym) for b in (4, 3) for gr in ("tensor", "channel", "group") for sym in (True, False)]


def grid_id(grid) -> str:
    b, gr, sym = grid
    return f"w{b}-{gr}-{'sym' if sym else 'asym'}"


def flexround(grid=(4, "channel", True), **kw) -> FlexRoundConfig:
    b, gr, sym = grid
    return FlexRoundConfig(name="f", method="flexround", bits=b, granularity=gr, group_size=16, symmetric=sym, **kw)


def weight(seed: int, n: int = 24, k: int = 48) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)


def mse(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ w_hat.t() - x @ w.t()).pow(2).mean())


@pytest.mark.parametrize("grid", GRIDS, ids=grid_id)
def test_zero_steps_is_rtn(grid):
    """S₂, s₃, s₄ start at 1 and s₁ at RTN's scale: before any step the codes and grid are RTN's, to the bit."""
    w = weight(0)
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    cfg = flexround(grid, steps=0)
    ref = quantize_weight(w, cfg)
    for t in (1, 3):  # a Linear, and a conv with 3 taps per input channel (s₄ too)
        qw = flexround_layer(w, x, t, cfg).weight
        assert torch.equal(qw.codes, ref.codes), f"{(qw.codes != ref.codes).sum()} codes differ from RTN"
        assert torch.equal(qw.scales, ref.scales) and qw.codes.dtype == ref.codes.dtype
        assert (qw.zeros is None) == (ref.zeros is None) and (qw.zeros is None or torch.equal(qw.zeros, ref.zeros))


@pytest.mark.parametrize("reconstruction", ["layer", "block"])
def test_zero_steps_on_a_model_is_rtn(reconstruction, trained_cnn, digits_split):
    cfg = flexround((3, "channel", True), steps=0, reconstruction=reconstruction)
    got, ref = quantize_flexround(trained_cnn, digits_split[0][:32], cfg), quantize_rtn(trained_cnn, None, cfg)
    assert list(got) == list(ref)
    assert all(torch.equal(got[n].weight.codes, ref[n].weight.codes) for n in ref)


@pytest.mark.parametrize("grid", [(3, "channel", True), (4, "group", False), (3, "tensor", True)], ids=grid_id)
def test_learned_weight_is_integral_on_its_grid(grid):
    """After training with a learned s₁, Ŵ/s₁ (+ z) is integral, in the code range, and the stored codes."""
    w, x = weight(2), torch.randn(128, 48, generator=torch.Generator().manual_seed(3))
    cfg = flexround(grid, steps=50, lr=1e-2)
    qw = flexround_layer(w, x, 3, cfg).weight
    assert not torch.equal(qw.scales, quantize_weight(w, cfg).scales), "s₁ should have been learned"
    g = qw.group_size
    q = dequantize(qw).reshape(24, 48 // g, g) / qw.scales[..., None]  # Ŵ/s₁ = q − z
    if qw.zeros is not None:
        q = q + qw.zeros[..., None]
    assert torch.allclose(q, q.round(), atol=1e-4), f"max distance to an integer {(q - q.round()).abs().max():.2e}"
    qmin, qmax = code_range(grid[0], grid[2])
    assert qmin <= float(q.round().min()) and float(q.round().max()) <= qmax
    assert torch.equal(q.round(), qw.codes.float().reshape(24, 48 // g, g))


def test_dequantize_is_the_learned_weight_exactly():
    cfg = flexround((4, "group", False))
    quantizer = FlexRoundWeight(weight(4), cfg, taps=3)
    with torch.no_grad():  # move every factor away from its start
        for p in quantizer.parameters():
            p.uniform_(-0.3, 0.3, generator=torch.Generator().manual_seed(6))
        learned = quantizer()
    assert torch.equal(dequantize(quantizer.quantized()), learned)


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("arch,layer", [("trained_mlp", "backbone.1"), ("trained_cnn", "backbone.body.3"),
                                        ("trained_mlp", "head")])
def test_final_mse_below_rtn_on_a_trained_layer(bits, arch, layer, request, digits_split):
    model = request.getfixturevalue(arch)
    module = model.get_submodule(layer)
    x = layer_inputs(model, module, digits_split[0][:256])
    w = module.weight.detach().reshape(module.weight.shape[0], -1)
    cfg = flexround((bits, "channel", True), steps=150, lr=3e-3)
    e_rtn = mse(w, dequantize(quantize_weight(w, cfg)), x)
    e = mse(w, flexround_layer(w, x, taps(module), cfg, examples=256).effective_weight(), x)
    assert e < e_rtn, f"{layer}: FlexRound {e:.3e} vs RTN {e_rtn:.3e}"


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("reconstruction", ["layer", "block"])
@pytest.mark.parametrize("arch", ["trained_mlp", "trained_cnn"])
def test_lower_layer_output_error_than_rtn(arch, reconstruction, bits, request, digits_split, dense_twin):
    """In the quantized model (each layer after the quantized ones before it), on the calibration set."""
    model = request.getfixturevalue(arch)
    calib = digits_split[0][:256]
    cfg = flexround((bits, "channel", True), steps=150, lr=3e-3, reconstruction=reconstruction)
    got = quantize_flexround(model, calib, cfg)
    names = list(quantizable(model, cfg))
    e = layer_output_errors(model, dense_twin(model, got), calib, names)
    e_rtn = layer_output_errors(model, dense_twin(model, quantize_rtn(model, None, cfg)), calib, names)
    assert all(e[n] < e_rtn[n] for n in names), {n: (round(e[n], 4), round(e_rtn[n], 4)) for n in names}


def test_seed_draws_the_minibatches():
    w, x = weight(7), torch.randn(256, 48, generator=torch.Generator().manual_seed(8))
    runs = [flexround_layer(w, x, 1, flexround(steps=20, lr=1e-2, batch_size=8, seed=s)).weight for s in (0, 0, 1)]
    assert torch.equal(runs[0].scales, runs[1].scales) and not torch.equal(runs[0].scales, runs[2].scales)


def test_vit_blocks_are_units(small_vit):
    cfg = flexround()
    units = block_units(small_vit, quantizable(small_vit, cfg))
    assert set(units) == {"backbone.embed", "backbone.blocks.0", "backbone.blocks.1", "head"}


def test_block_mode_lowers_vit_block_error(small_vit, digits_split, dense_twin):
    calib = digits_split[0][:128]
    cfg = flexround((4, "channel", True), steps=100, lr=3e-3, batch_size=32)
    got = quantize_flexround(small_vit, calib, cfg)
    assert set(got) == set(quantizable(working_copy(small_vit), cfg))  # in-projections included
    blocks = ["backbone.blocks.0", "backbone.blocks.1"]
    e = layer_output_errors(small_vit, dense_twin(small_vit, got), calib, blocks)
    e_rtn = layer_output_errors(small_vit, dense_twin(small_vit, quantize_rtn(small_vit, None, cfg)), calib, blocks)
    assert all(e[b] < e_rtn[b] for b in blocks), (e, e_rtn)
    # out_proj, which nn.MultiheadAttention reads by .weight, is learned in its block, not left at RTN
    rtn = quantize_rtn(small_vit, None, cfg)
    assert not torch.equal(got["backbone.blocks.0.attn.out_proj"].weight.codes,
                           rtn["backbone.blocks.0.attn.out_proj"].weight.codes)


class _Layer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor]:  # (B, T, D)
        out = h + self.fc2(torch.relu(self.fc1(h)))
        return (out * mask[..., None],) if mask is not None else (out,)


class _Encoder(nn.Module):
    """input_ids + attention_mask in, like a Hugging Face encoder; blocks in a ModuleList called with a kwarg."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.embed = nn.Embedding(20, d)
        self.layers = nn.ModuleList([_Layer(d) for _ in range(2)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, mask=attention_mask.float())[0]
        return h


def test_block_mode_takes_keyword_calibration_with_padding(dense_twin):
    gen = torch.Generator().manual_seed(9)
    model = _Encoder().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3, generator=gen)
    ids = torch.randint(0, 20, (24, 6), generator=gen)
    mask = (torch.arange(6)[None, :] < torch.randint(2, 7, (24, 1), generator=gen)).long()
    calib = {"input_ids": ids, "attention_mask": mask}
    cfg = flexround((3, "channel", True), steps=40, lr=3e-3, batch_size=8)
    got = quantize_flexround(model, calib, cfg)
    assert set(got) == {f"layers.{i}.fc{j}" for i in (0, 1) for j in (1, 2)}
    with torch.no_grad():
        ref = model(**calib)
        e, e_rtn = ((dense_twin(model, q)(**calib) - ref).norm() / ref.norm()
                    for q in (got, quantize_rtn(model, None, cfg)))
    assert e < e_rtn, f"output error FlexRound {e:.4f} vs RTN {e_rtn:.4f}"


def test_bad_config_is_one_line_naming_the_key():
    raw = {"quantize": {"variants": [{"name": "f", "method": "flexround", "bits": 4, "reconstruction": "blocks"}]}}
    with pytest.raises(ParamsError) as err:
        validate_params(raw, "params.yaml")
    message = str(err.value)
    assert "\n" not in message and message.startswith("params.yaml: quantize.variants.0.reconstruction: "), message
    assert "'layer' or 'block'" in message


@pytest.mark.parametrize("reconstruction", ["layer", "block"])
def test_needs_calibration(reconstruction, trained_mlp):
    with pytest.raises(ValueError, match="'f' .method flexround. needs calibration inputs"):
        quantize_flexround(trained_mlp, None, flexround(reconstruction=reconstruction))
