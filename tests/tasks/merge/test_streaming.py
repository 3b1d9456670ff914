import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from slimforge.artifacts import ArtifactError, save_tensors, sha256_file
from slimforge.checkpoint import model_spec
from slimforge.models import MLPConfig, build_model
from tasks.merge import streaming
from tasks.merge.checkpoints import open_checkpoint
from tasks.merge.streaming import (
    BLOCK,
    merge_in_memory,
    row_blocks,
    stream_merge,
)
from tasks.merge.task_arithmetic import TaskVectorConfig
from tasks.merge.ties import keep_threshold
from tasks.quantize import RtnConfig, quantize_model
from tasks.quantize.packed import packed_layout, read_layers

CONFIGS = {
    "task_arithmetic": TaskVectorConfig(),
    "ties_model": TaskVectorConfig(method="ties", density=0.3),
    "ties_tensor": TaskVectorConfig(method="ties", density=0.3, trim_scope="tensor"),
    "dare": TaskVectorConfig(method="dare", drop=0.5, seed=3),
    "dare_ties": TaskVectorConfig(method="dare", drop=0.5, consensus="ties", seed=3),
}


def _open(base, models):
    return open_checkpoint(base), [open_checkpoint(m) for m in models]


def _assert_same(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


@pytest.mark.parametrize("block", [BLOCK, 7, 1])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_streamed_merge_is_bit_identical_to_the_in_memory_merge(name, block, make_checkpoints, tmp_path):
    paths = make_checkpoints(3)
    before = [sha256_file(p) for p in [paths[0], *paths[1]]]
    base, models = _open(*paths)
    rescale = 0.7 if name == "dare" else None
    summary = stream_merge(base, models, tmp_path / "out.safetensors", 0.4, CONFIGS[name], rescale=rescale,
                           block=block)
    want = merge_in_memory(base, models, 0.4, CONFIGS[name], rescale=rescale)
    _assert_same(load_file(str(tmp_path / "out.safetensors")), want)
    assert want["half.weight"].dtype == torch.float16
    assert not torch.equal(want["embed.weight"], base.get("embed.weight"))
    assert summary["tensors"] == len(want) and summary["bytes"] == (tmp_path / "out.safetensors").stat().st_size
    assert [sha256_file(p) for p in [paths[0], *paths[1]]] == before  # deltas formed in read buffers only


@pytest.mark.parametrize("name", list(CONFIGS))
def test_blocks_leave_larger_tensors_bit_identical(name, tmp_path):
    """Tensors big enough for torch's vectorized reductions (whose association depends on the
    shape); task arithmetic and DARE read them in blocks of rows (DARE's masks drawn at the
    blocks' flat offsets), TIES its thresholds."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(300, 257, generator=g), "v": torch.randn(1001, generator=g)}
    save_tensors(tmp_path / "base.safetensors", base)
    for k in range(4):
        save_tensors(tmp_path / f"m{k}.safetensors", {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base.items()})
    ckpts = _open(tmp_path / "base.safetensors", [tmp_path / f"m{k}.safetensors" for k in range(4)])
    stream_merge(*ckpts, tmp_path / "out.safetensors", 0.3, CONFIGS[name], block=600)
    _assert_same(load_file(str(tmp_path / "out.safetensors")), merge_in_memory(*ckpts, 0.3, CONFIGS[name]))


def test_include_merges_only_matching_tensors_and_copies_the_rest(make_checkpoints, tmp_path):
    base, models = _open(*make_checkpoints(2))
    cfg = CONFIGS["ties_model"]
    stream_merge(base, models, tmp_path / "out.safetensors", 1.0, cfg, include=["layer.*"])
    got = load_file(str(tmp_path / "out.safetensors"))
    _assert_same(got, merge_in_memory(base, models, 1.0, cfg, include=["layer.*"]))
    assert torch.equal(got["embed.weight"], base.get("embed.weight"))
    assert not torch.equal(got["layer.0.weight"], base.get("layer.0.weight"))


def test_dtypes_promote_as_in_memory(make_checkpoints, tmp_path):
    base, models = make_checkpoints(2)
    save_tensors(models[1], load_file(str(models[1])) | {"half.weight": load_file(str(models[1]))["half.weight"].float()})
    base, models = _open(base, models)
    stream_merge(base, models, tmp_path / "out.safetensors", 0.5, CONFIGS["dare"])
    got = load_file(str(tmp_path / "out.safetensors"))
    _assert_same(got, merge_in_memory(base, models, 0.5, CONFIGS["dare"]))
    assert got["half.weight"].dtype == torch.float32  # float16 θ₀ + λ·(float32 θ_1 − θ₀)


def test_output_is_a_plain_safetensors_file_with_our_metadata(make_checkpoints, tmp_path):
    base, models = _open(*make_checkpoints(2))
    out = tmp_path / "sub" / "merged.safetensors"
    stream_merge(base, models, out, 0.3, TaskVectorConfig(), metadata={"method": "task_arithmetic", "lambda": "0.3"})
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"method": "task_arithmetic", "lambda": "0.3"}
    raw = out.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert n % 8 == 0 and len(raw) == 8 + n + max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    assert torch.equal(load_file(str(out))["norm.num_batches_tracked"], base.get("norm.num_batches_tracked"))


def test_lambda_zero_returns_the_base_exactly(make_checkpoints, tmp_path):
    base, models = _open(*make_checkpoints(3))
    stream_merge(base, models, tmp_path / "out.safetensors", 0.0, CONFIGS["dare_ties"])
    got = load_file(str(tmp_path / "out.safetensors"))
    for name in base.names():
        assert torch.equal(got[name], base.get(name).to(got[name].dtype)), name


def test_sharded_inputs_merge_like_single_files(make_checkpoints, shard, tmp_path):
    base, models = make_checkpoints(3)
    cfg = CONFIGS["ties_model"]
    stream_merge(*_open(base, models), tmp_path / "single.safetensors", 0.5, cfg)
    sharded = [shard(p, tmp_path / f"sharded{i}", 2 + i) for i, p in enumerate([base, *models])]
    stream_merge(*_open(sharded[0], sharded[1:]), tmp_path / "sharded.safetensors", 0.5, cfg)
    _assert_same(load_file(str(tmp_path / "sharded.safetensors")), load_file(str(tmp_path / "single.safetensors")))


def _no_output(directory, out):
    return not out.exists() and not any(p.name.startswith(f".{out.name}.tmp") for p in directory.iterdir())


def test_bad_inputs_raise_before_any_output_exists(make_checkpoints, shard, tmp_path):
    base, models = make_checkpoints(3)
    out = tmp_path / "out.safetensors"
    save_tensors(models[1], load_file(str(models[1])) | {"layer.1.weight": torch.zeros(3, 4, 3)})
    with pytest.raises(ArtifactError, match=rf"^models\[1\] {models[1]}: tensor 'layer.1.weight' has shape"):
        stream_merge(*_open(base, models), out, 0.5, TaskVectorConfig())
    save_tensors(models[1], {k: v for k, v in load_file(str(models[0])).items() if k != "layer.0.bias"})
    with pytest.raises(ArtifactError, match=rf"^models\[1\] {models[1]}: no tensor 'layer.0.bias'"):
        stream_merge(*_open(base, models), out, 0.5, TaskVectorConfig())
    sharded = shard(models[0], tmp_path / "sharded", 2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ArtifactError, match="which does not exist"):
        stream_merge(open_checkpoint(base), [open_checkpoint(sharded)], out, 0.5, TaskVectorConfig())
    with pytest.raises(ValueError, match="metadata maps strings to strings; 'lambda' holds float"):
        stream_merge(*_open(base, models[:1]), out, 0.5, TaskVectorConfig(), metadata={"lambda": 0.5})
    assert _no_output(tmp_path, out)


def test_a_failure_midway_leaves_no_partial_file_and_keeps_the_old_one(make_checkpoints, monkeypatch, tmp_path):
    base, models = _open(*make_checkpoints(2))
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous")
    calls = []

    def failing(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    real = streaming.merge_tensor
    monkeypatch.setattr(streaming, "merge_tensor", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        stream_merge(base, models, out, 0.5, TaskVectorConfig())
    assert out.read_bytes() == b"previous"
    assert not any(p.name.startswith(".out.safetensors.tmp") for p in tmp_path.iterdir())


def test_row_blocks_cover_the_tensor_in_whole_rows():
    assert row_blocks((7, 5), 10) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 7)]
    assert row_blocks((3, 4, 2), 1) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # at least one row
    assert row_blocks((), 10) == [None] and row_blocks((7, 5), None) == [None]


@pytest.mark.parametrize("density", [1e-4, 0.2, 0.5, 0.999, 1.0])
def test_in_place_threshold_is_the_kth_largest_magnitude(density):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_001, generator=g).abs()
    x[::7] = x[3]  # exact ties at and around the threshold
    keep = max(1, round(density * x.numel()))
    want = 0.0 if keep >= x.numel() else float(torch.kthvalue(x, x.numel() - keep + 1).values)
    assert keep_threshold(x.clone(), density) == want


def test_merging_quantized_checkpoints_equals_merging_their_float_twins(packed_artifact, tmp_path):
    """Each packed artifact is read dequantized. Its twin is a plain float safetensors file made
    from the packed tensors in memory: the model's state with each packed layer's weight set to
    its effective weight (the spec), not read through ``open_checkpoint``."""
    arch = MLPConfig(hidden=[32])
    spec, grid = model_spec(arch, (64,), 10), RtnConfig(name="w4", bits=4, granularity="group", group_size=16)
    quantized, twins = [], []
    for seed in range(3):
        model = build_model(arch, (64,), 10)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(generator=torch.Generator().manual_seed(seed))
        tensors = quantize_model(model, grid)
        quantized.append(packed_artifact(tmp_path / f"q{seed}", spec, tensors, packed_layout(grid, tensors)))
        twin = model.state_dict()
        for name, layer in read_layers(model, tensors, packed_layout(grid, tensors)).items():
            twin[f"{name}.weight"] = layer.effective_weight().reshape(twin[f"{name}.weight"].shape)
        twins.append(tmp_path / f"twin{seed}.safetensors")
        save_tensors(twins[-1], twin)
    cfg = CONFIGS["ties_model"]
    stream_merge(*_open(quantized[0], quantized[1:]), tmp_path / "q.safetensors", 0.5, cfg)
    stream_merge(*_open(twins[0], twins[1:]), tmp_path / "f.safetensors", 0.5, cfg)
    got, want = load_file(str(tmp_path / "q.safetensors")), load_file(str(tmp_path / "f.safetensors"))
    _assert_same(got, want)
    assert not torch.equal(want["head.weight"], load_file(str(twins[0]))["head.weight"])


@pytest.mark.parametrize("name", ["dare", "dare_ties"])
def test_dare_reads_blocks_of_rows_at_their_flat_offsets(name, make_checkpoints, monkeypatch, tmp_path):
    base, models = _open(*make_checkpoints(2))
    seen = []

    def spy(name_, w0, deltas, *args):
        seen.append((name_, w0.shape[0] if w0.dim() else None, args[-1]))
        return real(name_, w0, deltas, *args)

    real = streaming.merge_tensor
    monkeypatch.setattr(streaming, "merge_tensor", spy)
    stream_merge(base, models, tmp_path / "out.safetensors", 0.4, CONFIGS[name], block=7)
    monkeypatch.undo()
    _assert_same(load_file(str(tmp_path / "out.safetensors")), merge_in_memory(base, models, 0.4, CONFIGS[name]))
    embed = [offset for n, _, offset in seen if n == "embed.weight"]
    row = int(torch.Size(base.shape("embed.weight")[1:]).numel())
    assert len(embed) > 1 and embed == sorted(embed) and all(o % row == 0 for o in embed)
