"""LoRC (tasks/quantize/lorc.py): the SVD tail identity, monotone error in r, the bytes it adds to
a saved file, packed execution equal to the effective weight, and lower calibration error on
top of RTN, GPTQ and AWQ."""

import copy
import itertools
import json
import os
import struct

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open
from torch import nn

from slimforge.artifacts import ArtifactError, load_tensors
from slimforge.models import CNNConfig, MLPConfig
from tasks.quantize import AwqConfig, GptqConfig, get_method
from tasks.quantize.execution import Int4CpuLinear, Int8Linear, W4A16Linear
from tasks.quantize.layerwise import layer_output_errors
from tasks.quantize.lorc import apply_lorc, compensate, lorc_factors
from tasks.quantize.packed import (
    load_quantized,
    pack_layers,
    quantize_model,
    read_layers,
    save_packed,
)
from tasks.quantize.qat import QatConfig
from tasks.quantize.rtn import RtnConfig


def rtn_layer(w: torch.Tensor, bits: int = 3):
    return get_method("rtn").quantize(_single(w), None, RtnConfig(name="r", bits=bits))["lin"]


def _single(w: torch.Tensor) -> nn.Module:
    m = nn.Module()
    m.lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        m.lin.weight.copy_(w)
    return m


def data_bytes(path) -> int:
    """Bytes of tensor data in a safetensors file (size minus the 8-byte length and the JSON header)."""
    with open(path, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return os.path.getsize(path) - 8 - header


def test_factors_leave_exactly_the_singular_value_tail():
    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(0))
    e = w - rtn_layer(w).effective_weight()
    sigma = torch.linalg.svdvals(e.double())
    for r in (1, 2, 4, 8, 48, 100):
        u, v = lorc_factors(e, r)
        assert u.shape == (48, min(r, 48)) and v.shape == (min(r, 48), 80)
        residual = (e.double() - u.double() @ v.double()).pow(2).sum().item()
        tail = sigma[r:].pow(2).sum().item()
        assert residual == pytest.approx(tail, rel=1e-4, abs=1e-9), f"r={r}"
        # Û = U_rΣ_r^{1/2}, V̂ = Σ_r^{1/2}V_rᵀ: both Gram matrices are diag(σ_1..σ_r)
        torch.testing.assert_close(u.t() @ u, torch.diag(sigma[:r].float()), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v @ v.t(), torch.diag(sigma[:r].float()), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [16, 8])
def test_error_is_non_increasing_in_rank(bits):
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    layer = rtn_layer(w, bits=3)
    errs = [(w - layer.effective_weight()).norm().item()]
    errs += [(w - compensate(w, layer, r, bits).effective_weight()).norm().item() for r in (1, 2, 4, 8, 16)]
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(errs)), errs
    assert errs[-1] < 0.9 * errs[0], errs


@pytest.mark.parametrize("bits", [16, 8])
def test_added_bytes_are_rank_times_m_plus_n(bits, tmp_path, make_model):
    model = make_model(MLPConfig(hidden=[64]), (96,), 10, seed=2).eval()
    cfg = RtnConfig(name="w4", bits=4, granularity="group", group_size=32)
    sizes = {}
    for r in (0, 2, 4, 8):
        c = cfg.model_copy(update={"lorc_rank": r, "lorc_bits": bits})
        save_packed(tmp_path / f"{r}.safetensors", quantize_model(model, c), c)
        sizes[r] = data_bytes(tmp_path / f"{r}.safetensors")
    shapes = [(64, 96), (10, 64)]  # (m, n) of backbone.1 and head
    for r in (2, 4, 8):
        want = sum(r * (m + n) * bits // 8 + (0 if bits == 16 else 4 * (m + r)) for m, n in shapes)
        assert sizes[r] - sizes[0] == want, f"r={r}: {sizes[r] - sizes[0]} bytes added, expected {want}"


KINDS = [(RtnConfig(name="int8", bits=8), "auto", Int8Linear),
         (RtnConfig(name="w4", bits=4, granularity="group", group_size=32), "auto", Int4CpuLinear),
         (RtnConfig(name="w4", bits=4, granularity="group", group_size=32), "torch", W4A16Linear)]


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("cfg,kernel,kind", KINDS, ids=["int8-cpu", "int4-cpu", "w4a16-torch"])
def test_packed_round_trip_computes_the_effective_weight(cfg, kernel, kind, bits, tmp_path, dense_twin, make_model):
    model = make_model(MLPConfig(hidden=[64, 64]), (64,), 10, seed=3).eval()
    cfg = cfg.model_copy(update={"lorc_rank": 4, "lorc_bits": bits})
    layers = apply_lorc(model, get_method("rtn").quantize(model, None, cfg), cfg)
    path = tmp_path / "m.safetensors"
    save_packed(path, pack_layers(model, layers), cfg)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["lorc"]) == sorted(layers) and metadata["lorc_bits"] == str(bits)
    tensors = load_tensors(path)
    back = read_layers(model, tensors, metadata)
    for name, layer in layers.items():  # the stored factors are exactly the ones effective_weight used
        assert torch.equal(back[name].lorc.u, layer.lorc.u) and torch.equal(back[name].lorc.v, layer.lorc.v), name
    loaded = load_quantized(copy.deepcopy(model), tensors, metadata, kernel=kernel)
    assert type(loaded.backbone[1]) is kind and loaded.backbone[1].lorc_u.shape == (64, 4)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, got = dense_twin(model, back)(x), loaded(x)  # back: as stored (float16 scales)
    diff = (want - got).abs().max().item()
    if kernel == "torch":
        assert diff <= 1e-4, f"max |diff| {diff:.3e}"
    noise = (want - got).pow(2).sum() / want.pow(2).sum()
    assert noise < 10 ** -3.5, f"SQNR {-10 * noise.log10():.1f} dB, max |diff| {diff:.3e}"
    module, lr = loaded.backbone[1], layers["backbone.1"].lorc
    with torch.no_grad():  # the module adds exactly (x V̂ᵀ) Ûᵀ on its input
        full, module.lorc_u = module(x), None
        torch.testing.assert_close(full - module(x), (x @ lr.v.t()) @ lr.u.t(), atol=1e-5, rtol=1e-4)


def test_conv_layers_fold_the_correction_and_qat_rejects_it(tmp_path, dense_twin, make_model):
    model = make_model(CNNConfig(channels=[8, 16], hidden=32), (1, 12, 12), 10, seed=5).eval()
    cfg = RtnConfig(name="w3", bits=3, lorc_rank=2)
    layers = apply_lorc(model, get_method("rtn").quantize(model, None, cfg), cfg)
    save_packed(tmp_path / "c.safetensors", pack_layers(model, layers), cfg)
    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    loaded = load_quantized(copy.deepcopy(model), load_tensors(tmp_path / "c.safetensors"), metadata)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(loaded.get_submodule(n)) is nn.Conv2d for n in convs)
    x = torch.randn(3, 1, 12, 12, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), dense_twin(model, layers)(x), atol=2e-3, rtol=1e-3)
    with pytest.raises(ValidationError, match="lorc_rank"):
        QatConfig(name="q", method="qat", bits=4, lorc_rank=4)


def test_bad_lorc_tensors_raise_artifact_errors(tmp_path, make_model):
    model = make_model(MLPConfig(hidden=[64]), (64,), 10, seed=0).eval()
    cfg = RtnConfig(name="int8", bits=8, lorc_rank=2)
    state = quantize_model(model, cfg)
    save_packed(tmp_path / "m.safetensors", state, cfg)
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    for bad, match in (({**state, "head.lorc_v": state["head.lorc_v"][:, :5]}, r"head.lorc_u/lorc_v have shapes"),
                       ({**state, "head.lorc_u": state["head.lorc_u"].float()}, "expected torch.float16"),
                       ({k: v for k, v in state.items() if k != "head.lorc_v"}, "head.lorc_v is missing")):
        with pytest.raises(ArtifactError, match=match):
            load_quantized(copy.deepcopy(model), bad, metadata)


PTQ = [RtnConfig(name="rtn3", bits=3),
       GptqConfig(name="gptq3", method="gptq", bits=3),
       AwqConfig(name="awq3", method="awq", bits=3)]


@pytest.mark.parametrize("cfg", PTQ, ids=[c.name for c in PTQ])
def test_lorc_lowers_calibration_layer_error_on_a_trained_cnn(cfg, trained_cnn, digits_split, dense_twin):
    calib = digits_split[0][:256]
    layers = get_method(cfg.method).quantize(trained_cnn, calib, cfg)
    names = sorted(layers)
    errors = {}
    for r in (0, 2, 8):
        with_lorc = apply_lorc(trained_cnn, layers, cfg.model_copy(update={"lorc_rank": r}))
        errs = layer_output_errors(trained_cnn, dense_twin(trained_cnn, with_lorc), calib, names)
        errors[r] = sum(errs.values()) / len(errs)
    assert errors[8] < errors[2] < errors[0], errors


def test_stage_writes_lorc_and_adadim_variants(tmp_path):
    """The quantize stage applies LoRC to any method's layers and stores adadim's output-axis layers."""
    from slimforge.checkpoint import load_any
    from slimforge.config import validate_params
    from slimforge.workspace import Workspace
    from tasks.ingest.stage import run as run_ingest
    from tasks.quantize.stage import run as run_quantize
    from tasks.select.stage import run as run_select
    from tasks.train.stage import run as run_train

    variants = [{"name": "gptq3", "method": "gptq", "bits": 3},
                {"name": "gptq3_lorc4", "method": "gptq", "bits": 3, "lorc_rank": 4},
                {"name": "ada3", "method": "adadim", "bits": 3, "lorc_rank": 2, "lorc_bits": 8}]
    params = validate_params({
        "ingest": {"dataset": "digits", "max_examples": 400},
        "train": {"model": {"arch": "mlp", "hidden": [64, 32]}, "epochs": 3, "batch_size": 32, "lr": 0.005},
        "quantize": {"variants": variants, "calibration": {"size": 64}}}, "test")
    ws = Workspace(tmp_path)
    for run in (run_ingest, run_select, run_train, run_quantize):
        metrics = run(params, ws)
    assert metrics["gptq3_lorc4"]["calibration_layer_error"] < metrics["gptq3"]["calibration_layer_error"]
    assert metrics["gptq3_lorc4"]["size_bytes"] > metrics["gptq3"]["size_bytes"]
    with safe_open(str(ws.artifact("quantize") / "ada3" / "model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["lorc_bits"] == "8" and json.loads(metadata["lorc"]) == json.loads(metadata["packed"])
    model = load_any(ws.artifact("quantize") / "ada3")
    x = torch.rand(4, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(x).shape == (4, 10)


def test_files_from_before_lorc_and_group_axes_still_load(tmp_path, make_model):
    model = make_model(MLPConfig(hidden=[64]), (64,), 10, seed=0).eval()
    cfg = RtnConfig(name="w4", bits=4, granularity="group", group_size=32)
    state = quantize_model(model, cfg)
    save_packed(tmp_path / "m.safetensors", state, cfg)
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["lorc"] == "[]" and metadata["lorc_bits"] == "0" and metadata["group_axis_output"] == "[]"
    old = {k: v for k, v in metadata.items() if k not in ("lorc", "lorc_bits", "group_axis", "group_axis_output")}
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_quantized(copy.deepcopy(model), state, old)(x),
                           load_quantized(copy.deepcopy(model), state, metadata)(x))
    for key in ("lorc", "group_axis_output"):
        with pytest.raises(ArtifactError, match=f"{key} names layers that are not packed"):
            load_quantized(copy.deepcopy(model), state, {**metadata, key: '["nope"]'})
