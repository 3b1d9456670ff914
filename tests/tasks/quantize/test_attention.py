"""The attention in-projection as a quantized layer (tasks/quantize/attention.py, with its storage in
packed.py and execution in execution.py): every PTQ method quantizes ``<attn>.in_proj``, the packed file
keeps no float in_proj_weight, and the loaded ViT runs it on the low-bit kernels."""

import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn

from slimforge.artifacts import ArtifactError, load_tensors
from slimforge.models import SlimAttention, ViTConfig
from tasks.evaluate.harness import count_parameters
from tasks.quantize import AwqConfig, GptqConfig, get_method
from tasks.quantize import execution as execution_mod
from tasks.quantize.adadim import AdadimConfig
from tasks.quantize.attention import QkvAttention, in_proj_owner, qkv_attention, weight_key
from tasks.quantize.execution import Int4CpuLinear, Int8Linear, W4A16Linear, W8A8Linear
from tasks.quantize.flexround import FlexRoundConfig
from tasks.quantize.layerwise import layer_inputs, layer_output_errors, quantizable, working_copy
from tasks.quantize.lorc import apply_lorc
from tasks.quantize.packed import (
    load_quantized,
    pack_layers,
    packed_layout,
    read_layers,
    save_packed,
)
from tasks.quantize.rtn import RtnConfig, code_range, dequantize, quantize_weight
from tasks.quantize.smoothquant import SmoothQuantConfig

# block 0 keeps nn.MultiheadAttention (in_proj (192, 64)), block 1 is head-pruned to a SlimAttention (96, 64)
VIT = ViTConfig(patch=8, width=64, depth=2, heads=4, mlp=64, block_heads=[4, 2])
ATTNS = ["backbone.blocks.0.attn", "backbone.blocks.1.attn"]
IN_PROJ = [f"{a}.in_proj" for a in ATTNS]
G32 = {"granularity": "group", "group_size": 32}
METHODS = [  # every PTQ method, and LoRC on top of one
    RtnConfig(name="rtn", bits=4, **G32),
    GptqConfig(name="gptq", method="gptq", bits=4, **G32),
    AwqConfig(name="awq", method="awq", bits=4, **G32),
    SmoothQuantConfig(name="smoothquant", method="smoothquant"),
    FlexRoundConfig(name="flexround-block", method="flexround", bits=4, steps=5, **G32),
    FlexRoundConfig(name="flexround-layer", method="flexround", bits=4, steps=5, reconstruction="layer", **G32),
    AdadimConfig(name="adadim", method="adadim", bits=4, **G32),
    RtnConfig(name="rtn-lorc", bits=4, lorc_rank=4, **G32),
]


@pytest.fixture
def vit(make_model) -> nn.Module:
    """The seeded ViT with unit LayerNorm gains and in-projections scaled so that attention is far from
    uniform (a swap of q and k, or a wrong chunk, changes the output)."""
    model = make_model(VIT, (64,), 10, seed=5).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("in_proj_weight"):
                p.mul_(2.0)
    return model


@pytest.fixture
def calib(digits_split) -> torch.Tensor:
    return digits_split[0][:96]  # (96, 64) digit rows


def quantize_and_store(model: nn.Module, cfg, x: torch.Tensor, path):
    """(the method's layers, the packed file's tensors and metadata) of ``model``."""
    layers = apply_lorc(model, get_method(cfg.method).quantize(model, x, cfg), cfg)
    save_packed(path, pack_layers(model, layers), cfg)
    with safe_open(str(path), framework="pt") as f:
        return layers, load_tensors(path), f.metadata()


def test_split_attention_computes_the_attention(vit):
    x, y, z = torch.randn(3, 5, 8, 64, generator=torch.Generator().manual_seed(0)).unbind(0)  # (B, T, D) each
    for name in ATTNS:
        attn = vit.get_submodule(name)
        split = qkv_attention(attn)
        assert torch.equal(split.in_proj.weight, attn.in_proj_weight) and torch.equal(split.in_proj.bias, attn.in_proj_bias)
        with torch.no_grad():
            for q, k, v in ((x, x, x), (x, y, z)):  # self-attention (one in_proj call) and distinct inputs
                torch.testing.assert_close(split(q, k, v)[0], attn(q, k, v, need_weights=False)[0], atol=1e-5, rtol=1e-5)
    work = working_copy(vit)
    assert all(type(work.get_submodule(a)) is QkvAttention and type(work.get_submodule(a).out_proj) is nn.Linear
               for a in ATTNS)
    images = torch.randn(7, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(work(images), vit(images), atol=1e-5, rtol=1e-5)
    assert isinstance(vit.get_submodule(ATTNS[1]), SlimAttention)  # the model itself is not split


def test_in_projection_names_map_to_the_float_parameter(vit):
    assert [in_proj_owner(vit, n) for n in IN_PROJ] == ATTNS
    assert weight_key(vit, IN_PROJ[0]) == f"{ATTNS[0]}.in_proj_weight"
    assert weight_key(vit, "head") == "head.weight" and in_proj_owner(vit, "head") is None
    assert weight_key(working_copy(vit), IN_PROJ[0]) == f"{IN_PROJ[0]}.weight"  # split: a module's weight
    assert set(IN_PROJ) | {f"{a}.out_proj" for a in ATTNS} <= set(quantizable(working_copy(vit), METHODS[0]))


def test_rtn_rounds_the_in_proj_weight(vit):
    layers = get_method("rtn").quantize(vit, None, METHODS[0])
    for name, attn in zip(IN_PROJ, ATTNS, strict=True):
        want = quantize_weight(vit.get_submodule(attn).in_proj_weight.detach(), METHODS[0])
        assert torch.equal(layers[name].weight.codes, want.codes) and torch.equal(layers[name].weight.scales, want.scales)


@pytest.mark.parametrize("cfg", METHODS, ids=[c.name for c in METHODS])
def test_every_method_stores_the_in_projection_packed(cfg, vit, calib, tmp_path):
    layers, tensors, metadata = quantize_and_store(vit, cfg, calib, tmp_path / "q.safetensors")
    assert not [k for k in tensors if k.endswith("in_proj_weight")]  # no float in-projection left
    back = read_layers(vit, tensors, metadata)
    lo, hi = code_range(cfg.bits, cfg.symmetric)
    for name, attn in zip(IN_PROJ, ATTNS, strict=True):
        assert f"{name}.qweight" in tensors and tensors[f"{attn}.in_proj_bias"].dtype == torch.float32
        qw = back[name].weight
        n = vit.get_submodule(attn).in_proj_weight.shape[0]  # 3·inner
        assert qw.shape == ((n, 64) if back[name].group_axis == "input" else (64, n)), name
        assert lo <= int(qw.codes.min()) and int(qw.codes.max()) <= hi
        assert torch.equal(qw.codes, layers[name].weight.codes), name
        zeros = 0 if qw.zeros is None else qw.zeros.repeat_interleave(qw.group_size, dim=1)
        assert torch.equal(dequantize(qw), (qw.codes.float() - zeros) * qw.scales.repeat_interleave(qw.group_size, dim=1))
        torch.testing.assert_close(back[name].effective_weight(), layers[name].effective_weight(), rtol=2e-3, atol=1e-6)
    assert (back[IN_PROJ[0]].input_scale is not None) == (cfg.method in ("awq", "smoothquant"))
    assert (back[IN_PROJ[0]].lorc is not None) == (cfg.lorc_rank > 0)


EXECUTED = [(METHODS[0], "torch", W4A16Linear), (METHODS[0], "auto", Int4CpuLinear),
            (METHODS[2], "auto", Int4CpuLinear), (METHODS[3], "torch", W8A8Linear),
            (METHODS[7], "torch", W4A16Linear), (RtnConfig(name="int8", bits=8), "auto", Int8Linear)]


@pytest.mark.parametrize("cfg,kernel,kind", EXECUTED, ids=[f"{c.name}-{k}" for c, k, _ in EXECUTED])
def test_executed_vit_matches_its_dequantized_twin(cfg, kernel, kind, vit, calib, tmp_path, dense_twin):
    """The loaded ViT runs q, k, v on the packed kernel and matches the float ViT holding the stored
    layers' dequantized weights: to 1e-4 on the fp32 torch path, by an SQNR floor on the bf16 CPU op
    (W8A8: its dynamic int8 activations are simulated exactly by the torch reference alone)."""
    _, tensors, metadata = quantize_and_store(vit, cfg, calib, tmp_path / "q.safetensors")
    back = read_layers(vit, tensors, metadata)
    loaded = load_quantized(copy.deepcopy(vit), tensors, metadata, kernel=kernel)
    for attn in ATTNS:
        module = loaded.get_submodule(attn)
        assert type(module) is QkvAttention and type(module.in_proj) is kind and type(module.out_proj) is kind
        assert not list(module.in_proj.parameters())  # no float weight left behind
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = dense_twin(vit, back)(x), loaded(x)
    diff = (want - got).abs().max().item()
    if kind is W8A8Linear:
        noise = (want - got).pow(2).sum() / want.pow(2).sum()  # the twin has float activations
        assert noise < 1e-3, f"SQNR {-10 * noise.log10():.1f} dB, max |diff| {diff:.3e}"
    elif kernel == "torch":
        assert diff <= 1e-4, f"max |diff| {diff:.3e}"
    else:
        noise = (want - got).pow(2).sum() / want.pow(2).sum()
        assert noise < 10 ** -3.5, f"SQNR {-10 * noise.log10():.1f} dB, max |diff| {diff:.3e}"
    assert count_parameters(loaded) == count_parameters(vit)  # packed layers count by their logical size


def test_self_attention_runs_one_packed_matmul_per_block(vit, tmp_path, monkeypatch):
    _, tensors, metadata = quantize_and_store(vit, METHODS[0], None, tmp_path / "q.safetensors")
    loaded = load_quantized(copy.deepcopy(vit), tensors, metadata, kernel="auto")
    assert all(isinstance(loaded.get_submodule(n), Int4CpuLinear) for n in IN_PROJ)
    packs = {loaded.get_submodule(n).weight_int4pack.data_ptr(): n for n in IN_PROJ}  # the stacked q/k/v codes
    calls = []
    real = execution_mod.int4_weight_matmul
    monkeypatch.setattr(execution_mod, "int4_weight_matmul",
                        lambda x, w, *a: calls.append(packs.get(w.data_ptr())) or real(x, w, *a))
    with torch.no_grad():
        loaded(torch.randn(2, 64))
    assert [c for c in calls if c] == IN_PROJ  # one int4 matmul of each stacked in-projection, in order
    assert len(calls) == 2 * 4  # per block: in_proj, out_proj, mlp.0, mlp.2


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_in_projection_error_is_below_rtn(bits, small_vit, digits_split, dense_twin):
    calib = digits_split[0][:256]
    grid = {"bits": bits, "granularity": "group", "group_size": 16}
    names = [f"backbone.blocks.{i}.attn.in_proj" for i in (0, 1)]
    work = working_copy(small_vit)
    x = layer_inputs(work, work.get_submodule(names[0]), calib)
    assert x.shape == (256 * 8, 32)  # the query input of the first attention: 8 tokens of width 32 per image
    errors = {}
    for cfg in (RtnConfig(name="rtn", **grid), GptqConfig(name="gptq", method="gptq", **grid)):
        layers = get_method(cfg.method).quantize(small_vit, calib, cfg)
        errors[cfg.method] = layer_output_errors(small_vit, dense_twin(small_vit, layers), calib, names)
    assert all(errors["gptq"][n] < errors["rtn"][n] for n in names), errors


def test_in_projection_of_another_width_is_rejected(vit, make_model, tmp_path):
    _, tensors, metadata = quantize_and_store(vit, METHODS[0], None, tmp_path / "q.safetensors")
    other = make_model(VIT.model_copy(update={"block_heads": [4, 4]}), (64,), 10, seed=5)  # block 1: in_proj (192, 64)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ArtifactError, match="in_proj"):
        load_quantized(other, tensors, metadata)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    assert type(other.get_submodule(ATTNS[0])) is nn.MultiheadAttention  # not split either


def test_files_with_a_float_in_projection_still_load(vit, tmp_path, dense_twin):
    """Files from before in-projections were quantized hold in_proj_weight in float: the attention stays as
    it is and computes with it."""
    layers = {n: q for n, q in get_method("rtn").quantize(vit, None, METHODS[0]).items() if n not in IN_PROJ}
    tensors = pack_layers(vit, layers)
    assert f"{ATTNS[0]}.in_proj_weight" in tensors
    metadata = packed_layout(METHODS[0], tensors)
    loaded = load_quantized(copy.deepcopy(vit), tensors, metadata, kernel="torch")
    assert type(loaded.get_submodule(ATTNS[0])) is nn.MultiheadAttention
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the twin holds the stored layers (float16 scales)
        want, got = dense_twin(vit, read_layers(vit, tensors, metadata))(x), loaded(x)
    assert (want - got).abs().max() <= 1e-4
