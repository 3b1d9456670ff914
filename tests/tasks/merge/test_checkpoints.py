import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from slimforge.artifacts import META, WEIGHTS, ArtifactError, save_tensors, write_json_atomic
from slimforge.checkpoint import model_spec
from slimforge.models import MLPConfig, ViTConfig, build_model
from tasks.merge.checkpoints import CheckpointInputs, check_compatible, open_checkpoint, open_inputs
from tasks.quantize import RtnConfig, quantize_model
from tasks.quantize.packed import packed_layout

GRID = RtnConfig(name="w4g16", bits=4, granularity="group", group_size=16)
# Dequantized error bound, in steps: half a step of rounding, plus the fp16 rounding of the stored
# scale (relative 2^-11) times the largest code magnitude (8): 8 · 2^-11 = 1/256 of a step.
HALF_STEP_FP16_SCALES = 0.5 + 8 * 2**-11


def test_single_file_directory_and_shards_read_the_same_tensors(make_checkpoints, shard, tmp_path):
    base, _ = make_checkpoints(1)
    want = load_file(str(base))
    (tmp_path / "dir").mkdir()
    save_tensors(tmp_path / "dir" / WEIGHTS, want)
    sharded = shard(base, tmp_path / "sharded", 3)
    for path in (base, tmp_path / "dir", sharded, sharded / "model.safetensors.index.json"):
        with open_checkpoint(path) as ck:
            assert sorted(ck.names()) == sorted(want)
            for name, t in want.items():
                assert ck.shape(name) == tuple(t.shape) and ck.dtype(name) == t.dtype
                assert torch.equal(ck.get(name), t)
    ck = open_checkpoint(sharded)
    assert ck.file("embed.weight").parent == sharded and ck.file("embed.weight").name.startswith("model-000")
    assert torch.equal(ck.get("embed.weight", slice(2, 5)), want["embed.weight"][2:5])
    with ck:
        pass
    with pytest.raises(ArtifactError, match="already closed"):
        ck.get("embed.weight")


def test_a_mismatched_shape_names_the_model_file_and_tensor(make_checkpoints, tmp_path):
    base, models = make_checkpoints(3)
    bad = load_file(str(models[2])) | {"layer.0.weight": torch.zeros(6, 4)}
    save_tensors(models[2], bad)
    with pytest.raises(ArtifactError) as e:
        check_compatible(open_checkpoint(base), [open_checkpoint(m) for m in models])
    assert str(e.value) == (f"models[2] {models[2]}: tensor 'layer.0.weight' has shape (6, 4), base has (6, 5)")


def test_a_missing_tensor_or_a_non_float_one_is_refused(make_checkpoints):
    base, models = make_checkpoints(2)
    save_tensors(models[1], {k: v for k, v in load_file(str(models[1])).items() if k != "layer.0.bias"})
    with pytest.raises(ArtifactError, match=rf"^models\[1\] {models[1]}: no tensor 'layer.0.bias'"):
        check_compatible(open_checkpoint(base), [open_checkpoint(m) for m in models])
    # tensors outside ``include`` need not be there: they are copied from the base
    check_compatible(open_checkpoint(base), [open_checkpoint(m) for m in models], include=["embed.*"])
    save_tensors(models[0], load_file(str(models[0])) | {"embed.weight": torch.zeros(7, 5, dtype=torch.int32)})
    with pytest.raises(ArtifactError, match=r"models\[0\] .*tensor 'embed.weight' is torch.int32, base has torch.float32"):
        check_compatible(open_checkpoint(base), [open_checkpoint(m) for m in models])


def test_an_include_pattern_that_matches_nothing_is_refused(make_checkpoints):
    base, models = make_checkpoints(1)
    with pytest.raises(ValueError, match=r"include: pattern 'layers\.\*' matches no tensor of base"):
        check_compatible(open_checkpoint(base), [open_checkpoint(models[0])], include=["embed.*", "layers.*"])


def test_bad_paths_give_one_line_errors(make_checkpoints, shard, tmp_path):
    base, models = make_checkpoints(1)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (tmp_path / "empty").mkdir()
    sharded = shard(base, tmp_path / "sharded", 2)
    index = sharded / "model.safetensors.index.json"
    (sharded / json.loads(index.read_text())["weight_map"]["embed.weight"]).unlink()
    cases = {tmp_path / "nope.safetensors": "no such file or directory",
             garbage: "not a readable safetensors file",
             tmp_path / "empty": f"holds neither {WEIGHTS}, model.safetensors.index.json nor a packed {META}",
             sharded: "weight_map places tensor 'embed.weight' in shard 'model-00001-of-00002.safetensors', "
                      "which does not exist"}
    for path, message in cases.items():
        with pytest.raises(ArtifactError) as e:
            open_checkpoint(path)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ArtifactError, match=r"^models\[1\] .*nope.safetensors: no such file"):
        open_inputs(CheckpointInputs(base=str(base), models=[str(models[0]), str(tmp_path / "nope.safetensors")]))


def test_an_index_without_weight_map_and_an_unknown_format_are_refused(make_checkpoints, tmp_path):
    base, _ = make_checkpoints(1)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ArtifactError, match="not a safetensors index with a 'weight_map'"):
        open_checkpoint(tmp_path / "hf")
    (tmp_path / "sparse").mkdir()
    save_tensors(tmp_path / "sparse" / WEIGHTS, load_file(str(base)))
    write_json_atomic(tmp_path / "sparse" / META, {"format": "sparse"})
    with pytest.raises(ArtifactError, match="format 'sparse' is not one of dense, checkpoint, packed"):
        open_checkpoint(tmp_path / "sparse")


def test_inputs_config_is_strict():
    CheckpointInputs(base="b", models=["m"])
    with pytest.raises(ValidationError):
        CheckpointInputs(base="b", models=[])
    with pytest.raises(ValidationError):
        CheckpointInputs(base="b", models=["m"], weights="x")


def _grid_model(seed: int) -> torch.nn.Module:
    """An MLP whose Linear weights lie on the 4-bit group grid: codes in [−7, 7] times 2⁻⁵,
    every group of 16 holding a ±7, so RTN and float16 scales reproduce them exactly."""
    model = build_model(MLPConfig(hidden=[32]), (64,), 10)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in (model.backbone[1], model.head):
            codes = torch.randint(-7, 8, m.weight.shape, generator=g).float()
            codes[:, ::16] = 7.0
            m.weight.copy_(codes / 32)
            m.bias.normal_(generator=g)
    return model


def test_a_packed_artifact_reads_as_its_dequantized_float_state(packed_artifact, tmp_path):
    model = _grid_model(0)
    spec = model_spec(MLPConfig(hidden=[32]), (64,), 10)
    tensors = quantize_model(model, GRID)
    assert "head.qweight" in tensors and "head.weight" not in tensors
    ck = open_checkpoint(packed_artifact(tmp_path / "q", spec, tensors, packed_layout(GRID, tensors)))
    assert sorted(ck.names()) == sorted(model.state_dict())
    for name, t in model.state_dict().items():
        assert torch.equal(ck.get(name), t), name  # on the grid: dequantizing is exact
    noisy = build_model(MLPConfig(hidden=[32]), (64,), 10)
    tensors = quantize_model(noisy, GRID)
    ck = open_checkpoint(packed_artifact(tmp_path / "q2", spec, tensors, packed_layout(GRID, tensors)))
    w, got = noisy.head.weight.detach(), ck.get("head.weight")
    step = w.abs().amax() / 7
    assert not torch.equal(got, w) and (got - w).abs().max() <= step * HALF_STEP_FP16_SCALES


def test_a_packed_attention_in_projection_becomes_its_in_proj_weight(packed_artifact, tmp_path):
    cfg = ViTConfig(patch=8, width=32, depth=1, heads=2, mlp=32)
    spec, model = model_spec(cfg, (64,), 10), build_model(cfg, (64,), 10)
    tensors = quantize_model(model, GRID)
    attn = "backbone.blocks.0.attn"
    assert f"{attn}.in_proj.qweight" in tensors and f"{attn}.in_proj_weight" not in tensors
    ck = open_checkpoint(packed_artifact(tmp_path / "vit", spec, tensors, packed_layout(GRID, tensors)))
    assert not any(".qweight" in n or ".scales" in n for n in ck.names())
    w, got = model.get_parameter(f"{attn}.in_proj_weight").detach(), ck.get(f"{attn}.in_proj_weight")
    assert got.shape == w.shape == (96, 32) and not torch.equal(got, w)
    assert (got - w).abs().max() <= w.abs().max() / 7 * HALF_STEP_FP16_SCALES  # within half a 4-bit step
    assert set(ck.names()) == set(model.state_dict())

