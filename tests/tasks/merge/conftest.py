"""Fixtures of the merge tests: small checkpoints on disk sharing a base, and sharded copies."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimforge.artifacts import META, WEIGHTS, save_tensors, write_json_atomic

# mixed shapes and dtypes: a scalar, a 3-d kernel, a float16 tensor and an integer buffer
SHAPES = {"embed.weight": (7, 5), "layer.0.weight": (6, 5), "layer.0.bias": (6,), "layer.1.weight": (3, 4, 2),
          "layer.1.scale": (), "half.weight": (5, 3)}
HALF = {"half.weight"}


def random_state(seed: int, base: dict | None = None) -> dict[str, torch.Tensor]:
    """A base state (``base`` None) or a fine-tune of ``base``: base + a seeded perturbation."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in SHAPES.items():
        t = torch.randn(shape, generator=g) * (0.1 if base is not None else 1.0)
        t = t + base[name].float() if base is not None else t
        state[name] = t.half() if name in HALF else t
    state["norm.num_batches_tracked"] = torch.tensor(seed, dtype=torch.int64)  # a buffer, never merged
    return state


@pytest.fixture
def make_checkpoints(tmp_path):
    """make_checkpoints(k, seed=0) -> (base path, [k model paths]): single safetensors files."""

    def make(k: int, seed: int = 0) -> tuple[Path, list[Path]]:
        base = random_state(seed)
        save_tensors(tmp_path / f"base{seed}.safetensors", base)
        paths = []
        for i in range(k):
            paths.append(tmp_path / f"model{seed}_{i}.safetensors")
            save_tensors(paths[-1], random_state(1000 * seed + i + 1, base))
        return tmp_path / f"base{seed}.safetensors", paths

    return make


@pytest.fixture
def shard():
    """shard(file, directory, n) -> ``directory`` holding ``file``'s tensors in n shards and a
    Hugging Face-style model.safetensors.index.json."""

    def split(file: Path, directory: Path, n: int) -> Path:
        directory.mkdir(parents=True)
        tensors = load_file(str(file))
        weight_map = {}
        for i in range(n):
            shard_name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            part = {k: v for j, (k, v) in enumerate(sorted(tensors.items())) if j % n == i}
            save_tensors(directory / shard_name, part)
            weight_map |= dict.fromkeys(part, shard_name)
        write_json_atomic(directory / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
        return directory

    return split


@pytest.fixture
def packed_artifact():
    """packed_artifact(directory, spec, tensors, metadata) -> ``directory`` as the quantize stage
    writes one: the packed weights with their layout metadata and meta.json with the model spec."""

    def write(directory: Path, spec: dict, tensors: dict, metadata: dict) -> Path:
        directory.mkdir(parents=True)
        save_tensors(directory / WEIGHTS, tensors, metadata=metadata)
        write_json_atomic(directory / META, {"stage": "quantize", "model": spec, "format": "packed"})
        return directory

    return write
