"""One measuring harness for every artifact: accuracy, NLL, calibration, size, sparsity, speed
(FLOPs and peak memory of a forward pass: ``tasks.evaluate.cost``).

Calibration is the expected calibration error of *On Calibration of Modern Neural
Networks* (Guo, Pleiss, Sun, Weinberger; ICML 2017, eq. 3): predictions are grouped into
15 equal-width confidence bins and ``ECE = Σ_b |B_b|/n · |acc(B_b) − conf(B_b)|``.

Every function here is pure except ``size_on_disk``, which reads file sizes. Conventions:

* **Prunable weights** are the ``weight`` of every ``nn.Linear`` / ``nn.Conv*d``, as in the
  prune stage (so a ViT's attention ``in_proj_weight`` is not counted, its ``out_proj`` is).
  Biases, norms, position embeddings and packed quantized layers are not prunable.
* **Packed quantized layers** are modules with ``is_packed = True`` and ``in_features`` /
  ``out_features`` (the quantize stage's ``PackedLinear``: integer codes, possibly two int4
  nibbles per byte). ``sparsity`` skips them and counts exact zeros over the
  float weights only: a zero code is not a zero weight once zero-points are involved.
  ``count_parameters`` counts such a layer by its *logical* weight size,
  ``out_features · in_features``, plus a ``bias`` buffer if it keeps one; scales and zero-points are storage overhead and show
  up in ``bits_per_parameter`` via the bytes on disk, not in the parameter count.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ECE_BINS = 15


def device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def predict(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Logits (N, C) on the CPU for inputs x (N, ...), in eval mode and inference mode.

    The model's train/eval mode is restored afterwards, so calling this has no side effect.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device, was_training = device_of(model), model.training
    model.eval()
    try:
        with torch.inference_mode():
            chunks = [model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError("predict: x holds no examples")
    return torch.cat(chunks)


def expected_calibration_error(confidences: Tensor, correct: Tensor, n_bins: int = ECE_BINS) -> float:
    """ECE over ``n_bins`` equal-width bins (lo, hi] of confidence (Guo et al. 2017, eq. 3).

    confidences: (N,) max softmax probability in [0, 1]; correct: (N,) bool or 0/1.
    """
    conf = confidences.double().flatten()
    hit = correct.double().flatten()
    n = conf.numel()
    if n == 0:
        raise ValueError("expected_calibration_error: no predictions")
    # Bin b covers (b/n_bins, (b+1)/n_bins]; a confidence of exactly 0 joins the first bin.
    idx = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    sum_conf = torch.bincount(idx, weights=conf, minlength=n_bins)  # (n_bins,)
    sum_hit = torch.bincount(idx, weights=hit, minlength=n_bins)
    # |B|/n · |acc_b − conf_b| = |Σ hit − Σ conf| / n, which is 0 for empty bins.
    return float((sum_hit - sum_conf).abs().sum() / n)


def classification_metrics(logits: Tensor, y: Tensor, num_classes: int) -> dict:
    """accuracy, loss (mean NLL, nats), ece and per_class_accuracy for logits (N, C), labels (N,).

    ``per_class_accuracy[k]`` is None for a class with no examples (valid JSON, unlike NaN).
    """
    if logits.dim() != 2 or logits.shape[1] != num_classes or logits.shape[0] != y.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(y.shape)} and {num_classes} classes")
    logits, y = logits.float(), y.long()
    probs = logits.softmax(dim=1)  # (N, C)
    conf, pred = probs.max(dim=1)  # (N,), (N,)
    correct = pred == y
    return {
        "accuracy": float(correct.double().mean()),
        "loss": float(F.cross_entropy(logits, y)),
        "ece": expected_calibration_error(conf, correct),
        "per_class_accuracy": per_class_accuracy(logits, y, num_classes),
    }


def per_class_accuracy(logits: Tensor, y: Tensor, num_classes: int) -> list[float | None]:
    """Fraction in [0, 1] of the examples of each class k whose argmax logit is k; None if y has no k.

    logits (N, C), y (N,) integer labels in [0, num_classes). None rather than NaN keeps the list JSON.
    """
    if logits.dim() != 2 or logits.shape[1] != num_classes or logits.shape[0] != y.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(y.shape)} and {num_classes} classes")
    y = y.long()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got [{int(y.min())}, {int(y.max())}]")
    correct = (logits.float().argmax(dim=1) == y).double()  # (N,)
    hits = torch.bincount(y, weights=correct, minlength=num_classes)  # (C,)
    counts = torch.bincount(y, minlength=num_classes)  # (C,)
    return [float(h / c) if c else None for h, c in zip(hits.tolist(), counts.tolist())]


def prunable_weights(model: nn.Module) -> list[tuple[str, Tensor]]:
    """(name, tensor) of the float weights that pruning may zero; see the module docstring."""
    out: list[tuple[str, Tensor]] = []
    for name, module in model.named_modules():
        if getattr(module, "is_packed", False):
            continue  # packed quantized layer: integer codes, not float weights
        prefix = f"{name}." if name else ""
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and module.weight is not None:
            out.append((prefix + "weight", module.weight))
    return out


def sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over the prunable float weights; 0.0 if there are none."""
    weights = [w for _, w in prunable_weights(model)]
    total = sum(w.numel() for w in weights)
    if total == 0:
        return 0.0
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / total


def count_parameters(model: nn.Module) -> int:
    """Number of logical parameters: every nn.Parameter once, plus packed layers' logical size."""
    n = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if not getattr(module, "is_packed", False):
            continue
        n += module.in_features * module.out_features
        bias = dict(module.named_buffers(recurse=False)).get("bias")
        if bias is not None:
            n += bias.numel()
    return n


def latency_ms(model: nn.Module, input_shape: tuple[int, ...], batch_size: int, repeats: int,
               warmup: int, generator: torch.Generator) -> float:
    """Median wall-clock ms of ``repeats`` forward passes on a random (batch_size, *input_shape) batch.

    ``warmup`` untimed passes run first (allocator, oneDNN/JIT caches); timing uses
    ``time.perf_counter`` and synchronises CUDA around each pass when the model is on a GPU.
    """
    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(f"latency_ms needs repeats >= 1, warmup >= 0, batch_size >= 1; got {repeats}, {warmup}, {batch_size}")
    device, was_training = device_of(model), model.training
    x = torch.randn((batch_size, *input_shape), generator=generator).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: list[float] = []
    model.eval()
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            for _ in range(repeats):
                sync()
                start = time.perf_counter()
                model(x)
                sync()
                times.append((time.perf_counter() - start) * 1e3)
    finally:
        model.train(was_training)
    return float(statistics.median(times))


def size_on_disk(path: Path) -> int:
    """Bytes of a file, or the sum over every regular file under a directory."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    raise FileNotFoundError(f"{path}: no such file or directory to measure")


def bits_per_parameter(size_bytes: int, n_params: int) -> float:
    """Bits on disk per logical parameter (scales, zero-points and metadata included)."""
    if n_params <= 0:
        raise ValueError(f"bits_per_parameter: n_params must be > 0, got {n_params}")
    return 8.0 * size_bytes / n_params
