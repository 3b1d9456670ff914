"""Properties of the evaluation harness: metrics, ECE calibration, sparsity, counts, latency, size."""

from __future__ import annotations

import math
import time
import types

import pytest
import torch
from torch import nn

from slimforge.models import CNNConfig, MLPConfig, build_model
from tasks.evaluate import harness
from tasks.evaluate.harness import (
    bits_per_parameter,
    classification_metrics,
    count_parameters,
    expected_calibration_error,
    latency_ms,
    per_class_accuracy,
    predict,
    size_on_disk,
    sparsity,
)


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
