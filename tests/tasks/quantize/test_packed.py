"""Packed storage and low-bit execution (tasks/quantize/packed.py, execution.py): round trips through a file, for
every method (RTN, GPTQ, AWQ with its input scales, SmoothQuant's W8A8)."""

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from sklearn.datasets import load_digits
from torch import nn

from kernels.cpu import int8_dynamic_available
from slimforge.artifacts import ArtifactError, load_tensors, save_tensors
from slimforge.models import CNNConfig, MLPConfig, ViTConfig, build_model
from tasks.quantize import AwqConfig, GptqConfig, get_method
from tasks.quantize import execution as execution_mod
from tasks.quantize import packed as packed_mod
from tasks.quantize.execution import (
    Int4CpuLinear,
    Int8Linear,
    PackedLinear,
    W4A16Linear,
    W8A8Linear,
)
from tasks.quantize.packed import (
    load_quantized,
    pack_layers,
    packed_layout,
    quantize_model,
    read_layers,
    save_packed,
)
from tasks.quantize.rtn import RtnConfig, fake_quantize
from tasks.quantize.smoothquant import SmoothQuantConfig, w8a8_output


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref.double() - out.double()).pow(2).sum().clamp_min(1e-300)
    return 10 * torch.log10(ref.double().pow(2).sum() / noise).item()


def fake_quant_model(model: nn.Module, state: dict, cfg: RtnConfig) -> nn.Module:
    """The dense fake-quant twin: each weight that was packed replaced by Q(w)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in ref.named_modules():
            if f"{name}.qweight" in state:
                w = module.weight.reshape(module.weight.shape[0], -1)
                module.weight.copy_(fake_quantize(w, cfg).reshape(module.weight.shape))
    return ref


def round_trip(model: nn.Module, cfg: RtnConfig, tmp_path, kernel="auto") -> tuple[nn.Module, dict]:
    state = quantize_model(model, cfg)
    path = tmp_path / f"{cfg.name}.safetensors"
    save_tensors(path, state, metadata=packed_layout(cfg, state))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    loaded = load_quantized(copy.deepcopy(model), load_tensors(path), metadata, kernel=kernel)
    return loaded, state


VARIANTS = [  # config, module running Linear(64 -> 64), module running the head Linear(32 -> 10)
    (RtnConfig(name="int8", bits=8), Int8Linear, Int8Linear),
    (RtnConfig(name="int8a", bits=8, symmetric=False), Int8Linear, Int8Linear),
    (RtnConfig(name="int8t", bits=8, granularity="tensor"), Int8Linear, Int8Linear),
    (RtnConfig(name="int8g", bits=8, granularity="group", group_size=16), nn.Linear, nn.Linear),
    (RtnConfig(name="w4g32", bits=4, granularity="group", group_size=32), Int4CpuLinear, nn.Linear),
    (RtnConfig(name="w4g32a", bits=4, granularity="group", group_size=32, symmetric=False), Int4CpuLinear, nn.Linear),
    (RtnConfig(name="w3g64", bits=3, granularity="group", group_size=64), Int4CpuLinear, nn.Linear),
    (RtnConfig(name="w2g32a", bits=2, granularity="group", group_size=32, symmetric=False), Int4CpuLinear, nn.Linear),
]


@pytest.mark.parametrize("cfg,kind,head_kind", VARIANTS, ids=[v[0].name for v in VARIANTS])
def test_round_trip_matches_fake_quant(cfg, kind, head_kind, tmp_path, make_model):
    model = make_model(MLPConfig(hidden=[64, 32]), (64,), 10, seed=0).eval()
    loaded, state = round_trip(model, cfg, tmp_path)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = fake_quant_model(model, state, cfg)(x), loaded(x)
    db, diff = sqnr_db(ref, out), (ref - out).abs().max().item()
    assert db >= 35, f"SQNR {db:.1f} dB, max |diff| {diff:.3e}"
    # int8 groups and int4 with N = 10 fit no packed CPU kernel: dequantized to a dense Linear
    assert type(loaded.backbone[1]) is kind and type(loaded.head) is head_kind
    if not cfg.symmetric:
        assert "backbone.1.zeros" in state
    else:
        assert not any(k.endswith(".zeros") for k in state)


def test_loaded_model_runs_the_packed_ops(tmp_path, monkeypatch, make_model):
    model = make_model(MLPConfig(hidden=[64, 32]), (64,), 10, seed=0).eval()
    int8, _ = round_trip(model, RtnConfig(name="int8", bits=8), tmp_path)
    int4, _ = round_trip(model, RtnConfig(name="w4", bits=4, granularity="group", group_size=32), tmp_path)
    for m in (int8.backbone[1], int8.backbone[3], int4.backbone[1], int4.backbone[3]):
        assert isinstance(m, PackedLinear)
        assert not list(m.parameters())  # no float weight left behind
        assert {b.dtype for name, b in m.named_buffers() if name != "bias"} <= {
            torch.int8, torch.uint8, torch.int32, torch.bfloat16, torch.float32}
    assert int8.backbone[1].weight_int8.dtype == torch.int8
    assert int4.backbone[1].weight_int4pack.dtype == torch.uint8
    assert int4.backbone[1].weight_int4pack.numel() == 64 * 64 // 2  # half a byte per weight
    calls = []
    for fn in ("int8_weight_matmul", "int4_weight_matmul"):
        real = getattr(execution_mod, fn)
        monkeypatch.setattr(execution_mod, fn, lambda *a, _r=real, _n=fn: calls.append(_n) or _r(*a))
    with torch.no_grad():
        int8(torch.randn(2, 64)), int4(torch.randn(2, 64))
    assert calls == ["int8_weight_matmul"] * 3 + ["int4_weight_matmul"] * 2  # int4 head (N = 10) is dense


def test_explicit_w4a16_kernel(tmp_path, make_model):
    cfg = RtnConfig(name="w4", bits=4, granularity="group", group_size=16)
    model = make_model(MLPConfig(hidden=[40]), (48,), 10, seed=3).eval()  # head K = 40: not quantized
    loaded, state = round_trip(model, cfg, tmp_path, kernel="torch")
    assert isinstance(loaded.backbone[1], W4A16Linear) and type(loaded.head) is nn.Linear
    assert "head.weight" in state and state["head.weight"].dtype == torch.float32
    x = torch.randn(4, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = fake_quant_model(model, state, cfg)(x), loaded(x)
    assert sqnr_db(ref, out) >= 50, f"max |diff| {(ref - out).abs().max().item():.3e}"


def test_cnn_and_vit_dequantize_what_is_not_a_plain_linear(tmp_path, make_model):
    cnn = make_model(CNNConfig(channels=[16, 32], hidden=128), (1, 28, 28), 10, seed=1).eval()
    vit = make_model(ViTConfig(patch=4, width=32, depth=1, heads=2, mlp=64), (1, 8, 8), 10, seed=2).eval()
    for model, shape in ((cnn, (3, 1, 28, 28)), (vit, (3, 1, 8, 8))):
        cfg = RtnConfig(name="int8", bits=8)
        loaded, state = round_trip(model, cfg, tmp_path)
        assert any(k.endswith(".qweight") and "attn" in k for k in state) or model is cnn
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref, out = fake_quant_model(model, state, cfg)(x), loaded(x)
        assert sqnr_db(ref, out) >= 35, f"max |diff| {(ref - out).abs().max().item():.3e}"


def test_int4_cnn_file_is_at_most_a_sixth_of_fp32(tmp_path, make_model):
    model = make_model(CNNConfig(channels=[16, 32], hidden=128), (1, 28, 28), 10, seed=0)
    save_tensors(tmp_path / "fp32.safetensors", dict(model.state_dict()))
    cfg = RtnConfig(name="int4", bits=4, granularity="group", group_size=32)
    state = quantize_model(model, cfg)
    save_tensors(tmp_path / "int4.safetensors", state, metadata=packed_layout(cfg, state))
    ratio = os.path.getsize(tmp_path / "int4.safetensors") / os.path.getsize(tmp_path / "fp32.safetensors")
    assert ratio <= 1 / 6, f"int4 file is {ratio:.3f} of fp32"


def test_int8_per_channel_keeps_digits_accuracy(tmp_path, make_model):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # (1797, 64)
    y = torch.tensor(digits.target)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=gen)
    train, test = order[:1400], order[1400:]
    model = make_model(MLPConfig(), (64,), 10, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for batch in train[torch.randperm(len(train), generator=gen)].split(32):  # one epoch
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    model.eval()
    loaded, _ = round_trip(model, RtnConfig(name="int8", bits=8), tmp_path)
    assert isinstance(loaded.backbone[1], Int8Linear)
    with torch.no_grad():
        acc = [(m(x[test]).argmax(1) == y[test]).float().mean().item() * 100 for m in (model, loaded)]
    assert acc[0] > 80, f"fp32 MLP only reached {acc[0]:.1f}%"
    assert abs(acc[0] - acc[1]) < 1.0, f"fp32 {acc[0]:.2f}% vs int8 {acc[1]:.2f}%"


def test_bad_files_raise_artifact_errors(tmp_path, make_model):
    model = make_model(MLPConfig(hidden=[64]), (64,), 10, seed=0)
    cfg = RtnConfig(name="int8", bits=8)
    state = quantize_model(model, cfg)
    meta = packed_layout(cfg, state)
    with pytest.raises(ArtifactError, match="format"):
        load_quantized(copy.deepcopy(model), state, {})
    other = build_model(MLPConfig(hidden=[32]), (64,), 10)
    with pytest.raises(ArtifactError):
        load_quantized(other, state, meta)
    broken = {k: v for k, v in state.items() if k != "backbone.1.scales"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ArtifactError, match="backbone.1.scales"):
        load_quantized(model, broken, meta)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # left unchanged
    assert type(model.backbone[1]) is nn.Linear


CALIBRATED = [
    GptqConfig(name="gptq4", method="gptq", bits=4, granularity="group", group_size=32),
    GptqConfig(name="gptq3a", method="gptq", bits=3, granularity="group", group_size=32, symmetric=False,
               act_order=True, static_groups=True),
    GptqConfig(name="gptq8", method="gptq", bits=8, granularity="channel"),
    AwqConfig(name="awq4", method="awq", bits=4, granularity="group", group_size=32),
    AwqConfig(name="awq8a", method="awq", bits=8, granularity="channel", symmetric=False),
    AwqConfig(name="awq2", method="awq", bits=2, granularity="group", group_size=32, symmetric=False),
]


def _calibrated_round_trip(make_model, cfg, tmp_path, kernel):
    model = make_model(MLPConfig(hidden=[64, 32]), (64,), 10, seed=0).eval()
    calib = torch.randn(128, 64, generator=torch.Generator().manual_seed(4))
    layers = get_method(cfg.method).quantize(model, calib, cfg)
    state = pack_layers(model, layers)
    path = tmp_path / f"{cfg.name}.safetensors"
    save_packed(path, state, cfg)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_tensors(path)
    loaded = load_quantized(copy.deepcopy(model), tensors, metadata, kernel=kernel)
    return model, layers, read_layers(model, tensors, metadata), metadata, loaded


@pytest.mark.parametrize("cfg", CALIBRATED, ids=[c.name for c in CALIBRATED])
def test_every_method_round_trips_codes_exactly(cfg, tmp_path, make_model):
    _, layers, back, metadata, _ = _calibrated_round_trip(make_model, cfg, tmp_path, "auto")
    assert set(back) == set(layers) == {"backbone.1", "backbone.3", "head"}
    assert metadata["method"] == cfg.method
    assert json.loads(metadata["input_scales"]) == (sorted(layers) if cfg.method == "awq" else [])
    for name, layer in layers.items():
        assert torch.equal(back[name].weight.codes, layer.weight.codes), name
        torch.testing.assert_close(back[name].weight.scales, layer.weight.scales, rtol=1e-3, atol=0)  # float16
        if layer.input_scale is None:
            assert back[name].input_scale is None
        else:
            assert torch.equal(back[name].input_scale, layer.input_scale)


@pytest.mark.parametrize("cfg", [c for c in CALIBRATED if c.bits < 8], ids=[c.name for c in CALIBRATED if c.bits < 8])
def test_calibrated_artifacts_run_on_the_low_bit_modules(cfg, tmp_path, make_model):
    """The fp32 torch W4A16 path matches the dense reference built from the stored layers to
    1e-4; the CPU packed op (bf16 activations) by an SQNR floor."""
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(5))
    for kernel, module_type in (("torch", W4A16Linear), ("auto", Int4CpuLinear)):
        model, _, back, _, loaded = _calibrated_round_trip(make_model, cfg, tmp_path, kernel)
        assert type(loaded.backbone[1]) is module_type
        assert (loaded.backbone[1].input_scale is not None) == (cfg.method == "awq")
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for name, layer in back.items():
                ref.get_submodule(name).weight.copy_(layer.effective_weight())
            want, got = ref(x), loaded(x)
        diff = (want - got).abs().max().item()
        if kernel == "torch":
            assert diff <= 1e-4, f"max |diff| {diff:.3e}"
        else:
            assert sqnr_db(want, got) >= 35, f"max |diff| {diff:.3e}"


def test_bad_input_scales_raise_artifact_errors(tmp_path, make_model):
    cfg = CALIBRATED[3]
    model, layers, _, metadata, _ = _calibrated_round_trip(make_model, cfg, tmp_path, "auto")
    state = pack_layers(model, layers)
    short = {**state, "backbone.1.input_scale": state["backbone.1.input_scale"][:10]}
    with pytest.raises(ArtifactError, match=r"backbone.1.input_scale has shape \(10,\), expected \(64,\)"):
        load_quantized(copy.deepcopy(model), short, metadata)
    with pytest.raises(ArtifactError, match="input_scales names layers that are not packed"):
        load_quantized(copy.deepcopy(model), state, {**metadata, "input_scales": '["nope"]'})


SMOOTH = [SmoothQuantConfig(name="sq", method="smoothquant"),
          SmoothQuantConfig(name="sqt", method="smoothquant", granularity="tensor", activations="per_tensor", alpha=0.8)]


def _w8a8_reference(model: nn.Module, layers: dict, x: torch.Tensor, activations: str) -> torch.Tensor:
    """The MLP run layer by layer through smoothquant.w8a8_output (the kernels.w8a8 reference)."""
    h = x
    for name in ("backbone.1", "backbone.3", "head"):
        h = w8a8_output(layers[name], h, activations) + model.get_submodule(name).bias
        h = torch.relu(h) if name != "head" else h
    return h


@pytest.mark.parametrize("cfg", SMOOTH, ids=[c.name for c in SMOOTH])
def test_smoothquant_round_trips_as_w8a8(cfg, tmp_path, make_model):
    model, layers, back, metadata, loaded = _calibrated_round_trip(make_model, cfg, tmp_path, "torch")
    assert json.loads(metadata["w8a8"]) == {name: cfg.activations for name in layers}
    assert json.loads(metadata["input_scales"]) == sorted(layers)
    for name, layer in layers.items():
        assert torch.equal(back[name].weight.codes, layer.weight.codes)
        assert torch.equal(back[name].input_scale, layer.input_scale)
        module = loaded.get_submodule(name)
        assert type(module) is W8A8Linear and module.activations == cfg.activations and module.engine == "torch"
        assert module.weight_int8.dtype == torch.int8 and not list(module.parameters())
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want, got = _w8a8_reference(model, back, x, cfg.activations), loaded(x)
    # the loaded modules compute exactly the reference (codes exact, scales through float16 storage)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_w8a8_cpu_auto_engines(tmp_path, make_model):
    """CPU ``auto``: both granularities run fbgemm's dynamic int8 Linear, close to the reference."""
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(6))
    for cfg in SMOOTH:
        model, _, back, _, loaded = _calibrated_round_trip(make_model, cfg, tmp_path, "auto")
        engine = loaded.backbone[1].engine
        with torch.no_grad():
            want, got = _w8a8_reference(model, back, x, cfg.activations), loaded(x)
            fp32 = model(x)
        assert engine == ("fbgemm" if int8_dynamic_available() else "torch")
        assert sqnr_db(want, got) >= 30, f"{cfg.name}: max |diff| {(want - got).abs().max().item():.3e}"
        assert sqnr_db(fp32, got) >= 25, f"{cfg.name}: W8A8 vs fp32 max |diff| {(fp32 - got).abs().max().item():.3e}"


def test_files_without_w8a8_metadata_load_weight_only(tmp_path, make_model):
    cfg = CALIBRATED[4]  # awq8a: 8-bit with input scales, written before W8A8 existed
    model, _, _, metadata, _ = _calibrated_round_trip(make_model, cfg, tmp_path, "auto")
    state = load_tensors(tmp_path / f"{cfg.name}.safetensors")
    old = {k: v for k, v in metadata.items() if k != "w8a8"}
    loaded = load_quantized(copy.deepcopy(model), state, old)
    assert type(loaded.backbone[1]) is Int8Linear


def test_bad_w8a8_metadata_raises_artifact_errors(tmp_path, make_model):
    model, layers, _, metadata, _ = _calibrated_round_trip(make_model, SMOOTH[0], tmp_path, "auto")
    state = pack_layers(model, layers)
    for bad, match in (('{"nope": "per_token"}', "w8a8 names layers that are not packed"),
                       ('{"head": "per_channel"}', "'per_channel' is not one of per_token, per_tensor"),
                       ('["head"]', "w8a8 must map layer names")):
        with pytest.raises(ArtifactError, match=match):
            load_quantized(copy.deepcopy(model), state, {**metadata, "w8a8": bad})
    w4 = RtnConfig(name="w4", bits=4, granularity="group", group_size=32)
    w4_state = quantize_model(model, w4)
    with pytest.raises(ArtifactError, match="w8a8 layers need 8-bit symmetric"):
        load_quantized(copy.deepcopy(model), w4_state, {**packed_layout(w4, w4_state), "w8a8": '{"head": "per_token"}'})


def test_stage_artifact_executes_w8a8_modules(tmp_path):
    """A smoothquant variant written by the quantize stage loads back onto W8A8Linear modules."""
    from slimforge.checkpoint import load_any
    from slimforge.config import validate_params
    from slimforge.workspace import Workspace
    from tasks.ingest.stage import run as run_ingest
    from tasks.quantize.stage import run as run_quantize
    from tasks.select.stage import run as run_select
    from tasks.train.stage import run as run_train

    params = validate_params({
        "ingest": {"dataset": "digits", "max_examples": 400},
        "train": {"model": {"arch": "mlp", "hidden": [64, 32]}, "epochs": 3, "batch_size": 32, "lr": 0.005},
        "quantize": {"variants": [{"name": "sq", "method": "smoothquant"}], "calibration": {"size": 64}}}, "test")
    ws = Workspace(tmp_path)
    for run in (run_ingest, run_select, run_train, run_quantize):
        metrics = run(params, ws)
    assert metrics["sq"]["method"] == "smoothquant" and 0 < metrics["sq"]["calibration_layer_error"] < 0.2
    model = load_any(ws.artifact("quantize") / "sq")
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, PackedLinear))]
    assert linears and all(type(m) is W8A8Linear for m in linears)
    assert metrics["sq"]["calibration_agreement"] >= 0.9


SUB4 = [RtnConfig(name="w2c", bits=2), RtnConfig(name="w2g32a", bits=2, granularity="group", group_size=32, symmetric=False),
        RtnConfig(name="w3c", bits=3), RtnConfig(name="w3c_a", bits=3, symmetric=False)]


def _sub4_layers(make_model, cfg: RtnConfig, in_features: int = 96) -> tuple[nn.Module, dict]:
    model = make_model(MLPConfig(hidden=[64]), (in_features,), 10, seed=7).eval()
    return model, get_method("rtn").quantize(model, None, cfg)


def _dense_twin(model: nn.Module, layers: dict) -> nn.Module:
    """The pre-save dequantized model: each layer's ŵ with its scales rounded as float16 storage rounds them."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, layer in layers.items():
            qw = layer.weight
            scales = qw.scales.to(torch.float16).float().repeat_interleave(qw.group_size, dim=1)  # (N, K)
            zeros = 0 if qw.zeros is None else qw.zeros.repeat_interleave(qw.group_size, dim=1)
            ref.get_submodule(name).weight.copy_(scales * (qw.codes.float() - zeros))
    return ref


SUB4_SHAPES = [(c, k) for k in (96, 100) for c in SUB4 if c.granularity != "group" or k % c.group_size == 0]


@pytest.mark.parametrize("cfg,in_features", SUB4_SHAPES, ids=[f"{c.name}-K{k}" for c, k in SUB4_SHAPES])
def test_bitpacked_2_3_bit_artifact_forward_equals_the_pre_save_dequantized_model(cfg, in_features, tmp_path, make_model):
    """K = 100 is not a multiple of 8: rows end in zero padding."""
    model, layers = _sub4_layers(make_model, cfg, in_features)
    state = pack_layers(model, layers)
    path = tmp_path / f"{cfg.name}.safetensors"
    save_packed(path, state, cfg)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["code_storage"] == packed_mod.CODE_STORAGE[cfg.bits] != packed_mod.BYTE_STORAGE
    tensors = load_tensors(path)
    per_row = -(-in_features // 4) if cfg.bits == 2 else 3 * -(-in_features // 8)
    assert tuple(tensors["backbone.1.qweight"].shape) == (64, per_row)
    back = read_layers(model, tensors, metadata)
    assert all(torch.equal(back[n].weight.codes, layer.weight.codes) for n, layer in layers.items())
    x = torch.randn(9, in_features, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = _dense_twin(model, layers)(x)
        got = load_quantized(copy.deepcopy(model), tensors, metadata, kernel="torch")(x)
        cpu = load_quantized(copy.deepcopy(model), tensors, metadata, kernel="auto")(x)
    assert (want - got).abs().max().item() <= 1e-4, f"max |diff| {(want - got).abs().max().item():.3e}"
    assert sqnr_db(want, cpu) >= 35, f"max |diff| {(want - cpu).abs().max().item():.3e}"


def test_2_and_3_bit_weights_take_a_quarter_and_three_eighths_of_int8_bytes(tmp_path, make_model):
    sizes, files = {}, {}
    for bits in (8, 3, 2):
        cfg = RtnConfig(name=f"w{bits}", bits=bits)
        model, layers = _sub4_layers(make_model, cfg)
        state = pack_layers(model, layers)
        save_packed(tmp_path / f"{bits}.safetensors", state, cfg)
        sizes[bits] = {n: state[f"{n}.qweight"].numel() * state[f"{n}.qweight"].element_size() for n in layers}
        files[bits] = os.path.getsize(tmp_path / f"{bits}.safetensors")
    assert sizes[8] == {"backbone.1": 64 * 96, "head": 10 * 64}  # one byte per weight
    assert sizes[2] == {"backbone.1": 64 * 96 // 4, "head": 10 * 64 // 4}  # 1536, 160: a quarter
    assert sizes[3] == {"backbone.1": 64 * 96 * 3 // 8, "head": 10 * 64 * 3 // 8}  # 2304, 240: three eighths
    assert files[8] > files[3] > files[2]


def test_files_with_one_code_per_byte_still_load(tmp_path, make_model):
    """2/3-bit files written before bit packing (code_storage "one unsigned code per uint8 byte")."""
    for cfg in SUB4:
        model, layers = _sub4_layers(make_model, cfg)
        new = pack_layers(model, layers)
        old = dict(new)
        for name, layer in layers.items():  # the old storage: the unsigned codes, one per byte (N, K)
            offset = 2 ** (cfg.bits - 1) if cfg.symmetric else 0
            old[f"{name}.qweight"] = (layer.weight.codes.to(torch.int16) + offset).to(torch.uint8)
        meta = {**packed_layout(cfg, new), "code_storage": "one unsigned code per uint8 byte"}
        save_tensors(tmp_path / "old.safetensors", old, metadata=meta)
        tensors = load_tensors(tmp_path / "old.safetensors")
        with safe_open(str(tmp_path / "old.safetensors"), framework="pt") as f:
            metadata = f.metadata()
        back = read_layers(model, tensors, metadata)
        assert all(torch.equal(back[n].weight.codes, layer.weight.codes) for n, layer in layers.items()), cfg.name
        x = torch.randn(5, 96, generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            got = load_quantized(copy.deepcopy(model), tensors, metadata, kernel="torch")(x)
            want = load_quantized(copy.deepcopy(model), new, packed_layout(cfg, new), kernel="torch")(x)
        assert torch.equal(got, want), cfg.name
        with pytest.raises(ArtifactError, match=r"backbone.1.qweight has shape \(64, 96\), expected \(N, "):
            load_quantized(copy.deepcopy(model), old, packed_layout(cfg, new))  # per-byte codes, bit-packed label
