"""Atomic artifact directories and clear errors for bad checkpoints."""

import json

import pytest
import torch

from slimforge.artifacts import ArtifactError, atomic_dir, content_hash, load_tensors, save_tensors
from slimforge.checkpoint import load_model, model_spec, save_model
from slimforge.models import MLPConfig, build_model


def test_atomic_dir_leaves_nothing_on_failure_and_replaces_on_success(tmp_path):
    final = tmp_path / "artifacts" / "train"
    with atomic_dir(final) as d:
        (d / "a.txt").write_text("one")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as d:
            (d / "a.txt").write_text("half")
            raise RuntimeError("killed")
    assert (final / "a.txt").read_text() == "one"
    assert sorted(p.name for p in final.parent.iterdir()) == ["train"]


def test_content_hash_is_order_and_content_sensitive(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("1")
    h = content_hash(tmp_path / "a")
    (tmp_path / "a" / "x").write_text("2")
    assert content_hash(tmp_path / "a") != h


def _saved(tmp_path, cfg=MLPConfig(hidden=[8])):
    model = build_model(cfg, (4,), 3)
    save_model(tmp_path, model.state_dict(), model_spec(cfg, (4,), 3), root=tmp_path, stage="train",
               method="kaiming", config={}, seed=0, parents={})
    return model


def test_model_round_trip(tmp_path):
    model = _saved(tmp_path)
    loaded = load_model(tmp_path)
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), model.eval()(x))


def test_truncated_checkpoint_is_refused(tmp_path):
    _saved(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ArtifactError, match="model.safetensors: not a readable safetensors"):
        load_model(tmp_path)


def test_wrong_architecture_names_the_tensor(tmp_path):
    _saved(tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["model"]["config"]["hidden"] = [16]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"tensor 'backbone.1.weight' has shape \(8, 4\)"):
        load_model(tmp_path)


def test_nan_weights_are_refused(tmp_path):
    model = _saved(tmp_path)
    state = model.state_dict()
    state["head.bias"] = torch.tensor([0.0, float("nan"), 0.0])
    save_tensors(tmp_path / "model.safetensors", state)
    with pytest.raises(ArtifactError, match="'head.bias' contains NaN"):
        load_model(tmp_path)


def test_pickle_checkpoint_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2)}, path)  # a pickle archive under a safetensors name
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        load_tensors(path)


def test_same_tensors_and_metadata_give_the_same_bytes(tmp_path):
    tensors = {"w": torch.arange(6.0).view(2, 3), "q": torch.ones(4, dtype=torch.uint8)}
    metadata = {f"key{i}": str(i) for i in range(16)}  # safetensors keeps these in a hash map
    blobs = set()
    for i in range(5):
        save_tensors(tmp_path / f"{i}.safetensors", tensors, metadata)
        blobs.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(blobs) == 1
    assert torch.equal(load_tensors(tmp_path / "0.safetensors")["w"], tensors["w"])
