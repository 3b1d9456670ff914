import numpy as np
import pytest
import torch

from slimforge import sparse_format
from slimforge.artifacts import WEIGHTS, ArtifactError, load_tensors, save_tensors
from slimforge.checkpoint import load_model, model_spec, save_model
from slimforge.models import CNNConfig, build_model


def _sparse(shape, density, g):
    w = torch.randn(shape, generator=g)
    return w * (torch.rand(shape, generator=g) < density)


def test_bits_match_numpy_packbits_little_endian():
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 8, 9, 1000, 1823):
        mask = torch.rand(n, generator=g) < 0.3
        bits = sparse_format.pack_bits(mask)
        assert np.array_equal(bits.numpy(), np.packbits(mask.numpy(), bitorder="little"))
        assert torch.equal(sparse_format.unpack_bits(bits, n), mask)


def test_encode_decode_is_exact_and_keeps_dense_what_does_not_pay():
    g = torch.Generator().manual_seed(1)
    tensors = {"a.weight": _sparse((31, 17), 0.1, g), "b.weight": torch.randn(8, 8, generator=g),
               "c.bias": torch.zeros(5), "idx": torch.arange(4)}
    stored, layout = sparse_format.encode(tensors)
    assert set(layout) == {"a.weight", "c.bias"}  # dense b and integer idx stay as they are
    assert "b.weight" in stored and "idx" in stored
    back = sparse_format.decode(stored, layout)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(back[k], v), k


def test_decode_refuses_a_mask_that_disagrees_with_the_values():
    stored, layout = sparse_format.encode({"w": _sparse((40,), 0.2, torch.Generator().manual_seed(2))})
    stored["w.values"] = stored["w.values"][:-1]
    with pytest.raises(ValueError, match="'w' has .* mask bits set"):
        sparse_format.decode(stored, layout)


def test_sparse_artifact_round_trips_and_shrinks_with_sparsity(tmp_path):
    g = torch.Generator().manual_seed(3)
    model = build_model(CNNConfig(), (1, 28, 28), 10)
    state = {k: (v * (torch.rand(v.shape, generator=g) < 0.1) if k.endswith("weight") else v)
             for k, v in model.state_dict().items()}
    spec = model_spec(CNNConfig(), (1, 28, 28), 10)
    for fmt in ("dense", "sparse"):
        (tmp_path / fmt).mkdir()
        save_model(tmp_path / fmt, state, spec, root=tmp_path, stage="prune", method="m", config={}, seed=0,
                   parents={}, format=fmt)
    dense_bytes = (tmp_path / "dense" / WEIGHTS).stat().st_size
    sparse_bytes = (tmp_path / "sparse" / WEIGHTS).stat().st_size
    assert sparse_bytes < 0.2 * dense_bytes, (sparse_bytes, dense_bytes)
    loaded = load_model(tmp_path / "sparse").state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_corrupt_sparse_artifact_is_a_one_line_error(tmp_path):
    model = build_model(CNNConfig(channels=[4], hidden=8), (1, 8, 8), 3)
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    spec = model_spec(CNNConfig(channels=[4], hidden=8), (1, 8, 8), 3)
    save_model(tmp_path, state, spec, root=tmp_path, stage="prune", method="m", config={}, seed=0, parents={},
               format="sparse")
    stored = load_tensors(tmp_path / WEIGHTS)
    name = next(k for k in stored if k.endswith(".bits"))
    stored[name] = torch.full_like(stored[name], 255)
    save_tensors(tmp_path / WEIGHTS, stored)
    with pytest.raises(ArtifactError, match="mask bits set"):
        load_model(tmp_path)
