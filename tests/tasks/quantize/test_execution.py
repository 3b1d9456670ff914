"""CPU execution choices of the packed loader: the W4A8 path (execution.W4A8CpuLinear, ``cpu_int4: w4a8``)
and the weight-only layers' tiled fp32 path at large batches."""

import copy

import pytest
import torch
from torch import nn

import kernels.cpu
from kernels.cpu_w4a8 import torch_w4a8_matmul, w4a8_available
from slimforge.models import MLPConfig
from tasks.quantize import AwqConfig, execution
from tasks.quantize.execution import Int4CpuLinear, W4A8CpuLinear
from tasks.quantize.packed import load_quantized, packed_layout, quantize_model, read_layers
from tasks.quantize.rtn import RtnConfig

needs_ort = pytest.mark.skipif(not w4a8_available(), reason="onnxruntime (the [cpu] extra) is not installed")


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref.double() - out.double()).pow(2).sum().clamp_min(1e-300)
    return 10 * torch.log10(ref.double().pow(2).sum() / noise).item()


def load(model, cfg, cpu_int4, calib=None):
    state = quantize_model(model, cfg, calib)
    metadata = packed_layout(cfg, state)
    return load_quantized(copy.deepcopy(model), state, metadata, cpu_int4=cpu_int4), read_layers(model, state, metadata)


def layer_reference(layer, bias, x):
    """What a W4A8 layer must compute: input scale, then int8 blocks × the layer's own codes."""
    qw = layer.weight
    codes, zeros = execution._unsigned(qw)
    xs = x if layer.input_scale is None else x * layer.input_scale
    return torch_w4a8_matmul(xs, codes, qw.scales, zeros, qw.group_size) + bias


CONFIGS = [RtnConfig(name="w4", bits=4, granularity="group", group_size=32),
           RtnConfig(name="w4a", bits=4, granularity="group", group_size=32, symmetric=False),
           RtnConfig(name="w2a", bits=2, granularity="group", group_size=16, symmetric=False),
           AwqConfig(name="awq", method="awq", bits=4, granularity="group", group_size=32)]


@needs_ort
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
def test_w4a8_layers_compute_their_reference(cfg, make_model):
    model = make_model(MLPConfig(hidden=[64, 32]), (64,), 10, seed=0).eval()
    calib = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    loaded, layers = load(model, cfg, "w4a8", calib)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(1))
    module = loaded.backbone[1]
    assert type(module) is W4A8CpuLinear and not list(module.parameters())
    assert module.w4a8_B.numel() == 64 * 64 // 2  # half a byte per weight
    with torch.no_grad():
        out, ref = module(x), layer_reference(layers["backbone.1"], model.backbone[1].bias, x)
        weight_only = load(model, cfg, "w4a16", calib)[0]
        # torch's int4 op takes groups of 32 and up; a group of 16 runs dense there, W4A8 here
        assert type(weight_only.backbone[1]) is (Int4CpuLinear if cfg.group_size >= 32 else nn.Linear)
        assert sqnr_db(weight_only(x), loaded(x)) > 20  # the same weights, only the activation grid differs
    assert sqnr_db(ref, out) > 90, f"max |diff| {(ref - out).abs().max():.3e}"


@needs_ort
def test_w4a8_modules_copy_and_follow_the_thread_count(make_model):
    model = make_model(MLPConfig(hidden=[64, 32]), (64,), 10, seed=4).eval()
    loaded, _ = load(model, CONFIGS[0], "w4a8")
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            y1 = loaded(x)
            twin = copy.deepcopy(loaded)  # sessions are not copied: the twin builds its own
            assert twin.backbone[1]._sessions == {}
            torch.set_num_threads(2)
            y2 = twin(x)
    finally:
        torch.set_num_threads(threads)
    assert list(twin.backbone[1]._sessions) == [2] and list(loaded.backbone[1]._sessions) == [threads]
    assert torch.allclose(y1, y2, rtol=1e-5, atol=1e-6)


@needs_ort
def test_layers_matmulnbits_rejects_fall_back(make_model):
    model = make_model(MLPConfig(hidden=[48]), (48,), 16, seed=1).eval()
    cfg = RtnConfig(name="w4c", bits=4, granularity="channel")  # one group of 48: not a power of two
    loaded, _ = load(model, cfg, "w4a8")
    assert not any(isinstance(m, W4A8CpuLinear) for m in loaded.modules())
    assert type(loaded.backbone[1]) is nn.Linear  # nor does torch's int4 op take it: dequantized


def test_bad_or_unavailable_cpu_int4_setting(make_model, monkeypatch):
    model = make_model(MLPConfig(hidden=[64]), (64,), 16, seed=1).eval()
    with pytest.raises(ValueError, match="cpu_int4: 'w4a4' is not one of w4a16, w4a8"):
        load(model, CONFIGS[0], "w4a4")
    monkeypatch.setattr(execution, "w4a8_available", lambda: False)
    with pytest.raises(ValueError, match=r"onnxruntime, which is not installed \(pip install 'slimforge\[cpu\]'\)"):
        load(model, CONFIGS[0], "w4a8")


WEIGHT_ONLY = [(RtnConfig(name="int8", bits=8), execution.Int8Linear),
               (RtnConfig(name="int8a", bits=8, symmetric=False), execution.Int8Linear),
               (RtnConfig(name="w4a", bits=4, granularity="group", group_size=32, symmetric=False), Int4CpuLinear),
               (RtnConfig(name="w3", bits=3, granularity="group", group_size=64), Int4CpuLinear)]


@pytest.mark.parametrize("cfg,kind", WEIGHT_ONLY, ids=[c.name for c, _ in WEIGHT_ONLY])
def test_weight_only_layers_switch_to_tiled_fp32_at_large_batches(cfg, kind, make_model, monkeypatch):
    model = make_model(MLPConfig(hidden=[80]), (64,), 16, seed=2).eval()
    loaded, layers = load(model, cfg, "w4a16")
    module = loaded.backbone[1]
    assert type(module) is kind
    monkeypatch.setattr(kernels.cpu, "TILE_ROWS", 32)  # 80 output rows: tiles of 32, 32 and 16
    calls = []
    for fn in ("tiled_dense_matmul", "int8_weight_matmul", "int4_weight_matmul"):
        real = getattr(execution, fn)
        monkeypatch.setattr(execution, fn, lambda *a, _r=real, _n=fn: calls.append(_n) or _r(*a))
    big = torch.randn(kernels.cpu.DENSE_FROM_ROWS, 64, generator=torch.Generator().manual_seed(0))
    dense = big @ layers["backbone.1"].effective_weight().t() + model.backbone[1].bias
    with torch.no_grad():
        out_big, out_small = module(big), module(big[:3])
    assert calls == ["tiled_dense_matmul", "int4_weight_matmul" if kind is Int4CpuLinear else "int8_weight_matmul"]
    assert sqnr_db(dense, out_big) > 100, f"max |diff| {(dense - out_big).abs().max():.3e}"  # fp32 throughout
    assert 35 < sqnr_db(dense[:3], out_small) < 100  # the packed op's bf16 activations
