"""What a forward pass costs: FLOPs (float, packed, Triton-launched) and peak memory."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import kernels
from slimforge.artifacts import WEIGHTS
from slimforge.models import CNNConfig, MLPConfig, ViTConfig, build_model
from tasks.evaluate.cost import flops_per_example, peak_memory_bytes
from tasks.quantize import load_packed_artifact, quantize_model, save_packed
from tasks.quantize.rtn import RtnConfig
from tasks.quantize.smoothquant import SmoothQuantConfig


def test_flops_of_an_mlp_are_its_matmuls_and_exclude_bias_adds():
    model = build_model(MLPConfig(hidden=[256]), (1, 28, 28), 10)
    model.train()
    assert flops_per_example(model, (1, 28, 28)) == 2 * (784 * 256 + 256 * 10)
    assert model.training  # mode restored


def test_flops_of_a_cnn_count_its_convolutions():
    model = build_model(CNNConfig(channels=[4, 8], hidden=16), (1, 8, 8), 10)
    conv = 2 * (4 * 8 * 8) * (1 * 9) + 2 * (8 * 4 * 4) * (4 * 9)  # output elements · (C_in · 3 · 3), pooled 2x
    dense = 2 * (8 * 2 * 2 * 16 + 16 * 10)
    assert flops_per_example(model, (1, 8, 8)) == conv + dense


@pytest.mark.parametrize("block_heads", [None, [4, 1]], ids=["multihead", "pruned_heads"])
def test_flops_of_a_vit_count_attention(block_heads):
    # nn.MultiheadAttention's eval fast path is one op FlopCounterMode does not know; SlimAttention runs SDPA
    cfg = ViTConfig(patch=7, width=64, depth=2, heads=4, mlp=128, block_heads=block_heads)
    t, e, d = 16, 64, 16  # tokens (4x4 patches), width, head dim
    per_block = [2 * t * e * 3 * h * d + 4 * t * t * h * d + 2 * t * h * d * e + 2 * 2 * t * e * 128
                 for h in (block_heads or [4, 4])]  # in-projection, QKᵀ and AV, out-projection, MLP
    want = 2 * t * e * 49 + sum(per_block) + 2 * e * 10  # patch conv, blocks, head
    assert flops_per_example(build_model(cfg, (1, 28, 28), 10), (1, 28, 28)) == want


PACKED = [RtnConfig(name="w4g32", bits=4, granularity="group", group_size=32), RtnConfig(name="int8", bits=8),
          SmoothQuantConfig(name="w8a8", method="smoothquant")]


@pytest.mark.parametrize("cfg", PACKED, ids=[c.name for c in PACKED])
@pytest.mark.parametrize("arch", [MLPConfig(hidden=[64, 32]), ViTConfig(patch=7, width=64, depth=1, heads=4, mlp=64)],
                         ids=["mlp", "vit"])
def test_packed_model_reports_the_flops_of_its_float_twin(cfg, arch, tmp_path):
    gen = torch.Generator().manual_seed(5)
    model = build_model(arch, (1, 28, 28), 16).eval()
    x = torch.randn(32, 1, 28, 28, generator=gen)
    save_packed(tmp_path / WEIGHTS, quantize_model(model, cfg, x), cfg)
    packed = load_packed_artifact(tmp_path, copy.deepcopy(model))
    assert any(getattr(m, "is_packed", False) for m in packed.modules())  # really on the low-bit ops
    assert flops_per_example(packed, (1, 28, 28)) == flops_per_example(model, (1, 28, 28))


class _TritonStandIn(nn.Module):
    """A packed layer whose matmul no torch op performs, as a Triton launch: FlopCounterMode sees nothing."""

    is_packed, kernel = True, "triton"

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.in_features, self.out_features = d_in, d_out

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


@pytest.mark.skipif(not kernels.triton_available(), reason="triton is not installed")
def test_flops_of_a_triton_launch_are_its_dense_matmul(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets resolve_kernel pick Triton for a CPU module
    model = nn.Sequential(nn.Linear(12, 32), _TritonStandIn(32, 8))
    assert flops_per_example(model, (5, 12)) == 2 * 5 * (12 * 32 + 32 * 8)  # 5 tokens per example


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
                    or not kernels.triton_available(), reason="needs a GPU, or TRITON_INTERPRET=1, and triton")
def test_triton_packed_model_reports_the_flops_of_its_float_twin(tmp_path):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(MLPConfig(hidden=[64, 32]), (1, 28, 28), 16).eval()
    cfg = RtnConfig(name="w4g32", bits=4, granularity="group", group_size=32)
    save_packed(tmp_path / WEIGHTS, quantize_model(model, cfg), cfg)
    packed = load_packed_artifact(tmp_path, copy.deepcopy(model).to(device), kernel="triton")
    assert flops_per_example(packed.to(device), (1, 28, 28)) == flops_per_example(model, (1, 28, 28))


def test_peak_memory_grows_with_batch_size():
    model = build_model(MLPConfig(hidden=[256, 256]), (1, 28, 28), 10)
    small, large = (peak_memory_bytes(model, (1, 28, 28), b, torch.Generator().manual_seed(0)) for b in (1, 256))
    assert 0 < small < large


def test_peak_memory_of_a_linear_is_about_its_output_not_its_weights():
    out_bytes = 512 * 1000 * 4
    peak = peak_memory_bytes(nn.Linear(1000, 1000), (1000,), 512, torch.Generator().manual_seed(0))
    assert out_bytes <= peak < 10 * out_bytes
    # a 4 MB weight matrix, batch 1: only the (1, 1000) output is new
    assert peak_memory_bytes(nn.Linear(1000, 1000), (1000,), 1, torch.Generator().manual_seed(0)) < 1000 * 1000


def test_peak_memory_sees_a_temporary_freed_before_the_pass_ends():
    class Scratch(nn.Module):
        def forward(self, x):
            scratch = torch.ones(1_000_000)  # 4 MB, freed on return
            return x + scratch[:1]

    peak = peak_memory_bytes(Scratch(), (3,), 2, torch.Generator().manual_seed(0))
    assert 4_000_000 <= peak < 4_100_000
