"""The layer-by-layer driver (tasks/quantize/layerwise.py): layer inputs, order, fallbacks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimforge.models import ViTConfig, build_model
from tasks.quantize.gptq import GptqConfig, quantize_gptq
from tasks.quantize.layerwise import (
    QuantizedLayer,
    forward_order,
    layer_inputs,
    layer_output_errors,
    layer_weight,
    quantizable,
    quantize_in_order,
    quantize_rtn,
    working_copy,
)
from tasks.quantize.rtn import RtnConfig, dequantize, quantize_weight

CONVS = [
    nn.Conv2d(3, 5, 3, padding="same"),
    nn.Conv2d(3, 5, (1, 3), padding="same"),
    nn.Conv2d(3, 5, 2, padding="same"),  # even kernel: torch pads the extra row/column at the end
    nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=2),
    nn.Conv2d(3, 5, 4, stride=4),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: f"k{c.kernel_size}-s{c.stride}-p{c.padding}-d{c.dilation}")
def test_conv_inputs_reproduce_the_conv(conv):
    """X Wᵀ over the unfolded patches is the convolution itself."""
    x = torch.randn(2, 3, 9, 8, generator=torch.Generator().manual_seed(0))
    net = nn.Sequential(conv)
    cols = layer_inputs(net, conv, x)  # (B·L, C·kh·kw)
    with torch.no_grad():
        y = conv(x)  # (B, N, H', W')
        got = cols @ conv.weight.flatten(1).t() + conv.bias
    torch.testing.assert_close(got, y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1]), atol=1e-5, rtol=1e-5)


def test_grouped_convs_get_no_inputs():
    conv = nn.Conv2d(4, 4, 3, groups=2)
    assert layer_inputs(nn.Sequential(conv), conv, torch.randn(1, 4, 6, 6)) is None


def test_layers_are_calibrated_on_quantized_predecessors():
    """The second layer's X is what the *quantized* first layer feeds it, not the float one."""
    gen = torch.Generator().manual_seed(1)
    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16)).eval()
    x = torch.randn(40, 32, generator=gen)
    cfg = RtnConfig(name="r", bits=2)
    seen = {}

    def record(w, cols, taps, c):
        seen[tuple(w.shape)] = cols
        return QuantizedLayer(quantize_weight(w, c))

    layers = quantize_in_order(net, x, cfg, record)
    first = dequantize(layers["0"].weight)
    torch.testing.assert_close(seen[(16, 32)], F.relu(x @ first.t() + net[0].bias).detach())
    assert not torch.allclose(seen[(16, 32)], F.relu(net[0](x)).detach(), atol=1e-3)
    assert torch.equal(net[0].weight, net[0].weight.detach())  # and the model itself is untouched
    assert list(layers) == ["0", "2"]


def test_forward_order_is_call_order():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.late, self.early = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.late(self.early(x))

    net = Reversed()
    assert forward_order(net, torch.randn(1, 8), quantizable(net, RtnConfig(name="r", bits=8))) == ["early", "late"]


def test_attention_projections_are_calibrated_layers():
    """In the working copy nn.MultiheadAttention's in-projection and out_proj are Linear modules the
    calibration forward calls, so GPTQ gets their inputs (and not RTN's codes) and quantizes both."""
    vit = build_model(ViTConfig(patch=4, width=32, depth=1, heads=2, mlp=64), (1, 8, 8), 10).eval()
    cfg = GptqConfig(name="g", method="gptq", bits=4, granularity="group", group_size=16)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    layers = quantize_gptq(vit, x, cfg)
    work = working_copy(vit)
    assert set(layers) == set(quantizable(work, cfg)) >= {"backbone.blocks.0.attn.in_proj", "backbone.blocks.0.attn.out_proj"}
    for name in ("backbone.blocks.0.attn.in_proj", "backbone.blocks.0.attn.out_proj"):
        assert layer_inputs(work, work.get_submodule(name), x).shape == (16 * 4, 32)  # 4 tokens per image
        assert not torch.equal(layers[name].weight.codes, quantize_weight(layer_weight(vit, name), cfg).codes), name


def test_layer_output_errors_are_relative_and_zero_for_the_same_model():
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(3))
    assert layer_output_errors(net, net, x, ["0", "2"]) == {"0": 0.0, "2": 0.0}
    rtn = quantize_rtn(net, None, RtnConfig(name="r", bits=2))
    q = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    q.load_state_dict(net.state_dict())
    with torch.no_grad():
        for name, layer in rtn.items():
            q.get_submodule(name).weight.copy_(layer.effective_weight())
    errors = layer_output_errors(net, q, x, ["0", "2"])
    with torch.no_grad():
        y = net[0](x)
        assert errors["0"] == pytest.approx(float((q[0](x) - y).norm() / y.norm()), rel=1e-5)
    assert 0 < errors["0"] < 1
