"""SmoothQuant (tasks/quantize/smoothquant.py): METHODS.md §5 `smoothquant` properties."""

import copy
import json

import pytest
import torch
from pydantic import ValidationError

from kernels.w8a8 import quantize_activations
from tasks.quantize import get_method
from tasks.quantize.layerwise import QuantizedLayer, layer_inputs, quantizable, taps
from tasks.quantize.rtn import quantize_weight
from tasks.quantize.smoothquant import (
    SmoothQuantConfig,
    activation_errors,
    channel_max,
    quantize_smoothquant,
    smoothing_scales,
    smoothquant_layer,
    w8a8_output,
)


def sq(**kw) -> SmoothQuantConfig:
    return SmoothQuantConfig(name="sq", method="smoothquant", **kw)


def outlier_inputs(seed: int, m: int = 256, k: int = 64, factor: float = 50.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (24, k) and inputs (m, k) whose channel 7 carries ×factor activations."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    x[:, 7] *= factor
    return torch.randn(24, k, generator=gen) * 0.1, x


def test_config_fixes_int8_symmetric_and_is_registered():
    cfg = sq()
    assert (cfg.bits, cfg.symmetric, cfg.alpha, cfg.activations) == (8, True, 0.5, "per_token")
    assert get_method("smoothquant").config is SmoothQuantConfig
    for bad in ({"bits": 4}, {"symmetric": False}, {"granularity": "group"}, {"alpha": 1.5}, {"activations": "per_channel"},
                {"adaptive_tolerance": 0.5}):
        with pytest.raises(ValidationError):
            sq(**bad)


def test_migration_leaves_the_float_product_unchanged():
    """(x/s)·(W·s)ᵀ = x·Wᵀ before quantization; with s a power of two it is bit-exact."""
    w, x = outlier_inputs(0)
    s = smoothing_scales(channel_max(x, 1), channel_max(w, 1), 0.5)
    torch.testing.assert_close((x / s) @ (w * s).t(), x @ w.t(), rtol=1e-5, atol=1e-5)
    p2 = torch.exp2(torch.round(torch.log2(s)))  # rounding s to powers of two makes every step exact
    assert torch.equal((x / p2) @ (w * p2).t(), x @ w.t())


def test_alpha_limits_match_the_formula():
    w, x = outlier_inputs(1)
    a, b = channel_max(x, 1), channel_max(w, 1)
    torch.testing.assert_close(smoothing_scales(a, b, 0.0), 1 / b)
    torch.testing.assert_close(smoothing_scales(a, b, 1.0), a)
    torch.testing.assert_close(smoothing_scales(a, b, 0.3), a.pow(0.3) / b.pow(0.7))


def test_alpha_half_balances_channel_ranges():
    """At α = 0.5, max|X_j/s_j| = max|W_j·s_j| = √(max|X_j|·max|W_j|)."""
    w, x = outlier_inputs(2)
    layer = smoothquant_layer(w, x, 1, sq(alpha=0.5))
    s = 1 / layer.input_scale
    want = (channel_max(x, 1) * channel_max(w, 1)).sqrt()
    torch.testing.assert_close(channel_max(x / s, 1), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(channel_max(w * s, 1), want, rtol=1e-5, atol=0)
    assert torch.equal(layer.weight.codes, quantize_weight(w * s, sq()).codes)


def test_a_channel_dead_on_calibration_keeps_scale_one():
    w, x = outlier_inputs(3)
    x[:, 5] = 0  # never fires on the calibration set
    layer = smoothquant_layer(w, x, 1, sq(activations="per_tensor"))
    assert layer.input_scale[5] == 1 and (layer.input_scale[torch.arange(64) != 5] != 1).any()
    probe = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))  # fires channel 5 at test time
    ref = probe @ w.T
    err = (w8a8_output(layer, probe, "per_tensor") - ref).norm() / ref.norm()
    assert err < 0.05, err  # a 1e5 input scale on channel 5 would swamp the per-tensor grid


def test_conv_scales_take_the_max_over_taps():
    x = torch.tensor([[1.0, -5.0, 2.0, 0.5], [3.0, 0.0, -1.0, 4.0]])  # (M, C·taps), C = 2 channels of 2 taps
    torch.testing.assert_close(channel_max(x, 2), torch.tensor([5.0, 4.0]))


@pytest.mark.parametrize("activations", ["per_token", "per_tensor"])
@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.75])
def test_outlier_channel_w8a8_error_is_lower_with_smoothing(alpha, activations):
    w, x = outlier_inputs(3)
    ref = x @ w.t()
    plain = QuantizedLayer(quantize_weight(w, sq()))  # W8A8 without migration
    smooth = smoothquant_layer(w, x, 1, sq(alpha=alpha))
    e_plain, e_smooth = (float((w8a8_output(lay, x, activations) - ref).norm() / ref.norm()) for lay in (plain, smooth))
    assert e_smooth < e_plain, f"α={alpha}: smoothed {e_smooth:.5f} vs plain {e_plain:.5f}"


def test_w8a8_output_is_the_integer_product():
    w, x = outlier_inputs(4, m=9, k=32)
    layer = smoothquant_layer(w, x, 1, sq())
    x_q, x_s = quantize_activations(x * layer.input_scale, "per_token")
    want = (x_q.double() @ layer.weight.codes.double().t()) * x_s.double()[:, None] * layer.weight.scales.double().t()
    torch.testing.assert_close(w8a8_output(layer, x), want.float(), rtol=1e-6, atol=1e-7)


def test_trained_mlp_layers_are_all_smoothed(trained_mlp, digits_split):
    calib = digits_split[0][:128]
    cfg = sq()
    layers = quantize_smoothquant(trained_mlp, calib, cfg)
    assert set(layers) == set(quantizable(trained_mlp, cfg))
    for name, layer in layers.items():
        module = trained_mlp.get_submodule(name)
        assert layer.input_scale.shape == (module.in_features,) and bool((layer.input_scale > 0).all())
        assert layer.weight.codes.dtype == torch.int8 and layer.weight.group_size == module.in_features
        x = layer_inputs(trained_mlp, module, calib)
        assert taps(module) == 1 and x.shape[1] == module.in_features


def test_adaptive_keeps_per_tensor_unless_a_few_tokens_own_the_grid():
    w, x = outlier_inputs(5, factor=1.0)  # no outliers: one grid for all rows costs little
    layer = smoothquant_layer(w, x, 1, sq(activations="adaptive"))
    errors = activation_errors(layer, w, x)
    assert layer.activations == "per_tensor" and errors["per_tensor"] <= 2.0 * errors["per_token"]
    x_spiky = x.clone()
    x_spiky[:3] *= 100  # three tokens 100× larger, as a BERT FFN's GELU outputs have
    spiky = smoothquant_layer(w, x_spiky, 1, sq(activations="adaptive"))
    errors = activation_errors(spiky, w, x_spiky)
    assert spiky.activations == "per_token" and errors["per_tensor"] > 3 * errors["per_token"]
    loose = smoothquant_layer(w, x_spiky, 1, sq(activations="adaptive", adaptive_tolerance=1e6))
    assert loose.activations == "per_tensor"  # the tolerance is what decides
    assert smoothquant_layer(w, x_spiky, 1, sq()).activations is None  # fixed settings mark nothing


def test_adaptive_choices_reach_the_packed_layout_and_loader(trained_mlp, digits_split):
    from tasks.quantize.execution import W8A8Linear
    from tasks.quantize.packed import load_quantized, packed_layout, quantize_model

    x = digits_split[0][:256].clone()
    x[:2] *= 50  # two outlier rows: some layers will want per-token scales
    cfg = sq(activations="adaptive")
    state = quantize_model(trained_mlp, cfg, x)
    layout = json.loads(packed_layout(cfg, state)["w8a8"])
    chosen = quantize_smoothquant(trained_mlp, x, cfg)
    assert layout == {name: layer.activations for name, layer in chosen.items()}
    assert set(layout.values()) <= {"per_token", "per_tensor"}
    loaded = load_quantized(copy.deepcopy(trained_mlp), state, packed_layout(cfg, state))
    for name, activations in layout.items():
        module = loaded.get_submodule(name)
        assert isinstance(module, W8A8Linear) and module.activations == activations
