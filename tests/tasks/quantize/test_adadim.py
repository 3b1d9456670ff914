"""AdaDim and ``group_axis`` (tasks/quantize/adadim.py): per-IC groups (group_axis output) isolate
an outlier input channel, adaptive picks the better axis per layer by calibration error, and an
output-axis layer round-trips through the packed file."""

import copy
import json

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open
from torch import nn

from slimforge.artifacts import load_tensors
from slimforge.config import validate_params
from slimforge.models import MLPConfig
from tasks.quantize import GptqConfig, get_method
from tasks.quantize.adadim import AdadimConfig, adadim_layer, output_error
from tasks.quantize.awq import AwqConfig
from tasks.quantize.layerwise import layer_inputs, quantizable, quantize_layer
from tasks.quantize.lorc import apply_lorc
from tasks.quantize.packed import load_quantized, pack_layers, read_layers, save_packed
from tasks.quantize.rtn import RtnConfig


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_ic_groups_beat_per_oc_with_an_outlier_input_channel(seed):
    """An input channel ×20 (one column of W), 3 bits: per-IC groups (group_axis output) give it its
    own scales; per-OC groups (group_axis input) stretch the range of every row group holding it,
    which rounds the other weights of those groups to 0."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(seed))
    w[:, 37] *= 20
    rest = torch.arange(128) != 37

    def errors(cfg):
        e = {axis: w - quantize_layer(w, cfg, axis).effective_weight() for axis in ("input", "output")}
        return {axis: (d.norm().item(), d[:, rest].norm().item()) for axis, d in e.items()}

    channel = errors(RtnConfig(name="w3c", bits=3))  # one scale per row vs one per input column
    assert channel["output"][0] < 0.7 * channel["input"][0], channel
    grouped = errors(RtnConfig(name="w3g32", bits=3, granularity="group", group_size=32))
    # the weights beside the outlier keep about half the error; in total the outlier column's own
    # rounding (exact under per-OC, where it is its groups' maximum) about evens it out at g = 32
    assert grouped["output"][1] < 0.6 * grouped["input"][1], grouped


def test_adaptive_picks_the_better_axis_per_layer(make_model):
    model = make_model(MLPConfig(hidden=[64, 64]), (64,), 10, seed=1).eval()
    with torch.no_grad():
        model.backbone[1].weight[:, 5] *= 20  # outlier input channel: per-IC (output) wins
        model.backbone[3].weight[7] *= 20  # outlier output channel: per-OC (input) wins
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(2))
    cfg = AdadimConfig(name="ada", method="adadim", bits=3, granularity="group", group_size=32)
    layers = get_method("adadim").quantize(model, x, cfg)
    assert layers["backbone.1"].group_axis == "output" and layers["backbone.3"].group_axis == "input"
    assert layers["head"].group_axis == "input"  # N = 10: no output-axis groups of 32


def test_adaptive_calibration_error_is_at_most_both_fixed_axes(trained_mlp, digits_split):
    x = digits_split[0][:256]
    for bits, granularity in ((3, "channel"), (3, "group"), (4, "group")):
        cfg = AdadimConfig(name="ada", method="adadim", bits=bits, granularity=granularity, group_size=16)
        for name, module in quantizable(trained_mlp, cfg).items():
            w, cols = module.weight.detach(), layer_inputs(trained_mlp, module, x)
            chosen = output_error(w, adadim_layer(w, cols, 1, cfg), cols)
            fixed = [output_error(w, quantize_layer(w, cfg, axis), cols) for axis in ("input", "output")]
            assert chosen <= min(fixed) * (1 + 1e-9), f"{name} {bits}-bit {granularity}: {chosen} vs {fixed}"


@pytest.mark.parametrize("cfg", [RtnConfig(name="w4o", bits=4, granularity="group", group_size=16, group_axis="output"),
                                 RtnConfig(name="w3oa", bits=3, granularity="channel", group_axis="output", symmetric=False),
                                 RtnConfig(name="w8o", bits=8, group_axis="output", lorc_rank=2)],
                         ids=["w4g16", "w3c-asym", "int8-lorc"])
def test_output_axis_layers_round_trip_to_their_effective_weight(cfg, tmp_path, dense_twin, make_model):
    model = make_model(MLPConfig(hidden=[64, 32]), (48,), 10, seed=3).eval()
    layers = apply_lorc(model, get_method("rtn").quantize(model, None, cfg), cfg)
    output_axis = sorted(n for n, la in layers.items() if la.group_axis == "output")
    assert output_axis == ["backbone.1", "backbone.3"] or cfg.granularity != "group"  # head N = 10 stays input
    assert layers["backbone.1"].weight.shape == (48, 64)  # Wᵀ
    path = tmp_path / "m.safetensors"
    save_packed(path, pack_layers(model, layers), cfg)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["group_axis_output"]) == output_axis and metadata["group_axis"] == "output"
    tensors = load_tensors(path)
    back = read_layers(model, tensors, metadata)
    for name, layer in layers.items():
        assert back[name].group_axis == layer.group_axis and torch.equal(back[name].weight.codes, layer.weight.codes)
        torch.testing.assert_close(back[name].effective_weight(), layer.effective_weight(), atol=2e-3, rtol=1e-3)
    loaded = load_quantized(copy.deepcopy(model), tensors, metadata, kernel="torch")
    assert all(type(loaded.get_submodule(n)) is nn.Linear for n in output_axis)  # dequantized at load
    x = torch.randn(7, 48, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, got = dense_twin(model, back)(x), loaded(x)
    assert (want - got).abs().max().item() <= 1e-5


def test_group_axis_settings_are_validated():
    with pytest.raises(ValidationError, match="group_axis: 'output' is supported by method rtn or adadim or gptq"):
        AwqConfig(name="a", method="awq", bits=4, group_axis="output")
    assert GptqConfig(name="g", method="gptq", bits=4, group_axis="adaptive").group_axis == "adaptive"
    with pytest.raises(ValidationError, match="'adaptive' is supported by method adadim or gptq"):
        RtnConfig(name="r", bits=4, group_axis="adaptive")
    params = validate_params({"quantize": {"variants": [{"name": "a", "method": "adadim", "bits": 3}]}}, "p.yaml")
    assert params.quantize.variants[0].group_axis == "adaptive"
