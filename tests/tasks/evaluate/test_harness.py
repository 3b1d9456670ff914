"""Properties of the evaluation harness: metrics, ECE calibration, sparsity, counts, FLOPs, memory, latency, size."""

from __future__ import annotations

import copy
import math
import os
import time
import types

import pytest
import torch
from torch import nn

import kernels
from slimforge.artifacts import WEIGHTS
from slimforge.models import CNNConfig, MLPConfig, ViTConfig, build_model
from tasks.evaluate import harness
from tasks.evaluate.harness import (
    bits_per_parameter,
    classification_metrics,
    count_parameters,
    expected_calibration_error,
    flops_per_example,
    latency_ms,
    peak_memory_bytes,
    per_class_accuracy,
    predict,
    size_on_disk,
    sparsity,
)
from tasks.quantize import load_packed_artifact, quantize_model, save_packed
from tasks.quantize.rtn import RtnConfig
from tasks.quantize.smoothquant import SmoothQuantConfig


def _calibrated(gen: torch.Generator, bins: range, per_bin: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidences (N,) and hits (N,) where every bin's mean confidence equals its accuracy."""
    confs, hits = [], []
    for b in bins:
        lo = b / 15
        c = lo + (0.1 + 0.8 * torch.rand((), generator=gen).item()) / 15  # inside the bin, away from edges
        k = round(c * per_bin)  # correct predictions in this bin
        hit = torch.zeros(per_bin, dtype=torch.bool)
        hit[torch.randperm(per_bin, generator=gen)[:k]] = True
        confs.append(torch.full((per_bin,), k / per_bin, dtype=torch.float64))
        hits.append(hit)
    return torch.cat(confs), torch.cat(hits)


def test_ece_near_zero_when_confidence_equals_bin_accuracy():
    conf, hit = _calibrated(torch.Generator().manual_seed(0), range(15))
    assert expected_calibration_error(conf, hit) < 1e-3


def test_ece_near_zero_through_classification_metrics():
    gen = torch.Generator().manual_seed(1)
    conf, hit = _calibrated(gen, range(8, 15))  # binary: confidence is always > 1/2
    # logits (N, 2) with softmax = [1 - c, c]: predicted class 1, label 1 where the prediction is right.
    logits = torch.stack([torch.zeros_like(conf), torch.log(conf / (1 - conf))], dim=1).float()
    y = hit.long()
    assert classification_metrics(logits, y, 2)["ece"] < 1e-3


def test_ece_large_for_overconfident_wrong_predictor():
    logits = torch.tensor([[8.0, 0.0, 0.0]]).repeat(200, 1)  # confidence ~0.999 on class 0
    y = torch.ones(200, dtype=torch.long)  # always wrong
    m = classification_metrics(logits, y, 3)
    assert m["accuracy"] == 0.0
    assert m["ece"] > 0.99


def test_accuracy_loss_ece_on_hand_example():
    log = math.log
    # softmax rows: [.75, .25, 0], [.25, .75, 0], [.1, .9, 0]; labels 0, 0, 1; class 2 never appears
    logits = torch.tensor([[log(3), 0, -1e4], [0, log(3), -1e4], [0, log(9), -1e4]])
    y = torch.tensor([0, 0, 1])
    m = classification_metrics(logits, y, 3)
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["loss"] == pytest.approx(-(log(0.75) + log(0.25) + log(0.9)) / 3, abs=1e-6)
    # bin (.733, .8]: acc 1/2, conf .75 -> 2/3 * .25; bin (.867, .933]: acc 1, conf .9 -> 1/3 * .1
    assert m["ece"] == pytest.approx(1 / 6 + 1 / 30, abs=1e-6)
    assert m["per_class_accuracy"] == [pytest.approx(0.5), pytest.approx(1.0), None]


def test_per_class_accuracy_weighs_up_to_accuracy_and_marks_absent_classes():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(300, 6, generator=gen)
    y = torch.randint(0, 5, (300,), generator=gen)  # class 5 never appears
    per_class = per_class_accuracy(logits, y, 6)
    assert per_class[5] is None and all(0.0 <= a <= 1.0 for a in per_class[:5])
    counts = torch.bincount(y, minlength=6).tolist()
    weighted = sum(a * c for a, c in zip(per_class[:5], counts[:5])) / len(y)
    metrics = classification_metrics(logits, y, 6)
    assert weighted == pytest.approx(metrics["accuracy"])
    assert metrics["per_class_accuracy"] == per_class
    with pytest.raises(ValueError, match="labels must lie in"):
        per_class_accuracy(logits, torch.full((300,), 6), 6)


def test_predict_batches_agree_and_mode_is_restored():
    gen = torch.Generator().manual_seed(2)
    model = build_model(MLPConfig(hidden=[16]), (1, 4, 4), 5)
    x = torch.randn(23, 1, 4, 4, generator=gen)
    model.train()
    small, whole = predict(model, x, batch_size=7), predict(model, x, batch_size=512)
    assert small.shape == (23, 5)
    torch.testing.assert_close(small, whole)
    assert model.training


def _fill_ones(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)


@pytest.mark.parametrize("cfg", [MLPConfig(hidden=[8, 8]), CNNConfig(channels=[4], hidden=6)])
def test_sparsity_counts_exact_zeros_and_ignores_biases(cfg):
    gen = torch.Generator().manual_seed(3)
    model = build_model(cfg, (1, 8, 8), 3)
    _fill_ones(model)
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    total = sum(w.numel() for w in weights)
    zeroed = 0
    with torch.no_grad():
        for w in weights:
            k = int(torch.randint(0, w.numel(), (), generator=gen))
            w.view(-1)[torch.randperm(w.numel(), generator=gen)[:k]] = 0.0
            zeroed += k
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.bias.zero_()  # zero biases must not count
    assert sparsity(model) == zeroed / total
    assert sparsity(build_model(cfg, (1, 8, 8), 3)) == 0.0


class _Packed(nn.Module):
    """A stand-in packed int4 layer: two codes per byte, logical shape (out, in)."""

    is_packed = True

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.in_features, self.out_features = d_in, d_out
        self.register_buffer("qweight", torch.zeros(d_out, d_in // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(d_out))
        self.register_buffer("bias", torch.zeros(d_out))


def test_packed_layers_skip_sparsity_and_count_logically():
    model = nn.Sequential(nn.Linear(6, 8), _Packed(8, 4))
    _fill_ones(model)
    with torch.no_grad():
        model[0].weight[0, :3] = 0.0
    assert sparsity(model) == 3 / 48  # only the float Linear's weights
    assert count_parameters(model) == (6 * 8 + 8) + (8 * 4 + 4)


def test_count_parameters_matches_numel_for_float_models():
    model = build_model(MLPConfig(hidden=[10]), (4,), 3)
    assert count_parameters(model) == 4 * 10 + 10 + 10 * 3 + 3


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


class _Clock:
    """Fake perf_counter: each timed pass takes the next scripted duration (ms)."""

    def __init__(self, durations_ms: list[float]):
        self.durations, self.now, self.calls = list(durations_ms), 0.0, 0

    def perf_counter(self) -> float:
        self.calls += 1
        if self.calls % 2 == 0:  # end of a pass
            self.now += self.durations.pop(0) / 1e3
        return self.now


def test_latency_is_median_of_timed_repeats(monkeypatch):
    clock = _Clock([3.0, 1.0, 50.0, 2.0, 4.0])
    monkeypatch.setattr(harness, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    calls = []

    class Counting(nn.Module):
        def forward(self, x):
            calls.append(x.shape)
            return x

    ms = latency_ms(Counting(), (3,), batch_size=4, repeats=5, warmup=2, generator=torch.Generator().manual_seed(0))
    assert ms == pytest.approx(3.0)
    assert len(calls) == 7 and calls[0] == (4, 3)


def test_latency_of_a_slow_model_is_at_least_its_sleep():
    class Slow(nn.Module):
        def forward(self, x):
            time.sleep(0.005)
            return x

    ms = latency_ms(Slow(), (2,), batch_size=1, repeats=3, warmup=1, generator=torch.Generator().manual_seed(0))
    assert 5.0 <= ms < 1000.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_latency_waits_for_the_kernels():
    class Spin(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            torch.cuda._sleep(50_000_000)  # an asynchronous kernel spinning ~tens of ms; returns at once
            return x * self.w

    start = time.perf_counter()
    torch.cuda._sleep(50_000_000)
    torch.cuda.synchronize()
    spin_ms = (time.perf_counter() - start) * 1e3
    ms = latency_ms(Spin().cuda(), (2,), batch_size=1, repeats=3, warmup=1, generator=torch.Generator().manual_seed(0))
    assert ms >= 0.5 * spin_ms


def test_size_on_disk_and_bits(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 23)
    assert size_on_disk(tmp_path / "a.bin") == 100
    assert size_on_disk(tmp_path) == 123
    with pytest.raises(FileNotFoundError, match="missing"):
        size_on_disk(tmp_path / "missing")
    assert bits_per_parameter(1000, 250) == 32.0
    with pytest.raises(ValueError):
        bits_per_parameter(1000, 0)
