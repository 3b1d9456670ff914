"""AWQ (tasks/quantize/awq.py): METHODS.md §5 `awq` properties on synthetic and trained layers."""

import pytest
import torch
from torch import nn

from tasks.quantize.awq import (
    AwqConfig,
    awq_layer,
    input_channel_means,
    quantize_awq,
    search_scales,
)
from tasks.quantize.layerwise import layer_inputs, quantizable, taps
from tasks.quantize.rtn import RtnConfig, dequantize, quantize_weight

GRIDS = [(b, gr) for b in (4, 3) for gr in ("channel", "group")]


def awq(bits_gran, **kw) -> AwqConfig:
    return AwqConfig(name="a", method="awq", bits=bits_gran[0], granularity=bits_gran[1], group_size=16, **kw)


def rtn(grid) -> RtnConfig:
    return RtnConfig(name="r", bits=grid[0], granularity=grid[1], group_size=16)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    ref = x @ w.t()
    return float((x @ w_hat.t() - ref).norm() / ref.norm())


def outlier_inputs(seed: int, m: int = 512, k: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (24, k) and inputs (m, k) where 2 input channels carry ×20 activations."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    x[:, [5, 33]] *= 20
    return torch.randn(24, k, generator=gen) * 0.1, x


def test_alpha_zero_without_clipping_is_rtn():
    w, x = outlier_inputs(0)
    layer = awq_layer(w, x, 1, awq((4, "group"), grid=1, clip=False))  # the grid holds only α = 0
    assert torch.equal(layer.input_scale, torch.ones(64))
    assert torch.equal(layer.weight.codes, quantize_weight(w, rtn((4, "group"))).codes)


def test_scales_are_normalised_and_follow_activations():
    w, x = outlier_inputs(1)
    s, alpha = search_scales(w, x, 1, awq((3, "channel")))
    assert alpha > 0, "salient input channels should be scaled up"
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)
    assert set(s.topk(2).indices.tolist()) == {5, 33}  # the outlier channels get the largest scales


def test_conv_scales_are_per_input_channel():
    x = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 6)  # (M, C·taps), C = 2 channels of 3 taps
    torch.testing.assert_close(input_channel_means(x, 3), torch.tensor([(0 + 1 + 2 + 6 + 7 + 8) / 6,
                                                                         (3 + 4 + 5 + 9 + 10 + 11) / 6]))


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"w{g[0]}-{g[1]}")
def test_never_worse_than_rtn_with_outlier_channels(grid):
    w, x = outlier_inputs(2)
    e_rtn = output_error(w, dequantize(quantize_weight(w, rtn(grid))), x)
    e_scale = output_error(w, awq_layer(w, x, 1, awq(grid, clip=False)).effective_weight(), x)
    e_clip = output_error(w, awq_layer(w, x, 1, awq(grid)).effective_weight(), x)
    assert e_clip <= e_scale < e_rtn, f"RTN {e_rtn:.4f}, scales {e_scale:.4f}, scales + clip {e_clip:.4f}"


def test_effective_weight_is_quantized_scaled_weight_over_s():
    """The layer computes Q(W·diag(s))·(x/s): codes are of W·s, input_scale is 1/s per channel."""
    w, x = outlier_inputs(3)
    cfg = awq((4, "channel"), clip=False)
    layer = awq_layer(w, x, 1, cfg)
    s = 1 / layer.input_scale
    assert torch.equal(layer.weight.codes, quantize_weight(w * s, cfg).codes)
    torch.testing.assert_close(x @ layer.effective_weight().t(), (x * layer.input_scale) @ dequantize(layer.weight).t())


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"w{g[0]}-{g[1]}")
@pytest.mark.parametrize("arch", ["trained_mlp", "trained_cnn"])
def test_lower_layer_error_than_rtn_on_trained_layers(grid, arch, request, digits_split):
    model = request.getfixturevalue(arch)
    calib = digits_split[0][:256]
    layers = quantizable(model, rtn(grid))
    assert layers
    for name, module in layers.items():
        x = layer_inputs(model, module, calib)
        w = module.weight.detach().reshape(module.weight.shape[0], -1)
        e_rtn = output_error(w, dequantize(quantize_weight(w, rtn(grid))), x)
        e = output_error(w, awq_layer(w, x, taps(module), awq(grid)).effective_weight(), x)
        assert e < e_rtn, f"{name}: AWQ {e:.4f} vs RTN {e_rtn:.4f}"


def test_conv_layers_store_one_input_scale_per_channel(trained_cnn, digits_split):
    layers = quantize_awq(trained_cnn, digits_split[0][:64], awq((4, "channel")))
    conv = trained_cnn.backbone.body[3]
    assert isinstance(conv, nn.Conv2d) and layers["backbone.body.3"].input_scale.shape == (conv.in_channels,)
    assert layers["head"].input_scale.shape == (trained_cnn.head.in_features,)
