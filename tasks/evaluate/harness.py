"""One measuring harness for every artifact: accuracy, NLL, calibration, size, sparsity, FLOPs, memory, speed.

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

import math
import statistics
import time
from itertools import accumulate
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import kernels

ECE_BINS = 15


def _device_of(model: nn.Module) -> torch.device:
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
    device, was_training = _device_of(model), model.training
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


def _dense_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    """A low-bit matmul x (M, K) -> (M, N) counted as the dense matmul it stands for: 2·M·K·N."""
    return 2 * math.prod(out_shape) * x_shape[-1]


def _mha_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """nn.MultiheadAttention's eval fast path, one op: q/k/v and out projections, QKᵀ and AV."""
    (b, t, e), s = q_shape, k_shape[1]
    return 2 * b * e * (e * (t + 2 * s) + 2 * t * s + t * e)


# Ops FlopCounterMode's own registry misses (torch 2.13): it would count them as 0 FLOPs.
_EXTRA_FLOPS = {
    torch.ops.aten._weight_int8pack_mm: _dense_flops,
    torch.ops.aten._weight_int4pack_mm_for_cpu: _dense_flops,
    torch.ops.quantized.linear_dynamic: _dense_flops,
    torch.ops.aten._int_mm: _dense_flops,
    torch.ops.aten._native_multi_head_attention: _mha_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:  # q, k, v (B, H, T, hd): QKᵀ and AV
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
}


def _launches_triton(module: nn.Module) -> bool:
    """Whether a packed module's matmul is a direct Triton launch, which no TorchDispatchMode sees."""
    kernel = getattr(module, "engine", getattr(module, "kernel", None))
    if kernel not in kernels.KERNELS:
        return False  # fbgemm, or a module whose matmul is a torch op
    try:
        return kernels.resolve_kernel(kernel, _device_of(module)) == "triton"
    except ValueError:
        return False


def flops_per_example(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Forward FLOPs of one example (a batch of 1 of zeros), a multiply-add counted as 2 FLOPs.

    Counted by ``torch.utils.flop_counter.FlopCounterMode``, which counts matmuls (mm, addmm,
    bmm), convolutions and attention only: bias adds, norms, activations and softmax are 0.
    A packed low-bit layer counts as the dense matmul it stands for, 2·in·out per token: the
    packed CPU ops through ``_EXTRA_FLOPS``, a Triton launch by a forward hook. Its real extra
    work (LoRC's rank-r matmuls) is counted as ops like any other.
    """
    device, was_training = _device_of(model), model.training
    x = torch.zeros((1, *input_shape), device=device)
    unseen: list[int] = []  # FLOPs of Triton launches
    hook = lambda m, args, out: unseen.append(2 * args[0].numel() * m.out_features)
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if getattr(m, "is_packed", False) and _launches_triton(m)]
    model.eval()
    try:
        with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS) as counter:
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return counter.get_total_flops() + sum(unseen)


def peak_memory_bytes(model: nn.Module, input_shape: tuple[int, ...], batch_size: int,
                      generator: torch.Generator) -> int:
    """Peak bytes allocated by one forward pass of a random (batch_size, *input_shape) batch, above those before.

    Counted: every tensor torch allocates during the pass (activations, the output, workspace
    tensors of ops); not the weights or the input, which exist before it. One untimed pass runs
    first, so one-time caches (cuBLAS workspace, prepacked weights) are not charged to it.
    CUDA: the caching allocator's ``max_memory_allocated`` minus ``memory_allocated`` before.
    CPU: the running sum of torch's CPU allocation and free events recorded by
    ``torch.profiler`` (``profile_memory=True``); memory a library mallocs on its own, outside
    torch's allocator (oneDNN scratchpads, fbgemm buffers), is not seen.
    """
    if batch_size < 1:
        raise ValueError(f"peak_memory_bytes needs batch_size >= 1, got {batch_size}")
    device, was_training = _device_of(model), model.training
    x = torch.randn((batch_size, *input_shape), generator=generator).to(device)
    model.eval()
    try:
        with torch.inference_mode():
            model(x)
            return _cuda_peak(model, x, device) if device.type == "cuda" else _cpu_peak(model, x)
    finally:
        model.train(was_training)


def _cuda_peak(model: nn.Module, x: Tensor, device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    _output = model(x)  # kept alive until the peak is read: the output counts
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _cpu_peak(model: nn.Module, x: Tensor) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _output = model(x)  # kept alive until the peak is read: the output counts
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]  # +alloc / -free bytes
    return max(accumulate((n for _, n in sorted(events, key=lambda e: e[0])), initial=0))  # peak of live bytes


def latency_ms(model: nn.Module, input_shape: tuple[int, ...], batch_size: int, repeats: int,
               warmup: int, generator: torch.Generator) -> float:
    """Median wall-clock ms of ``repeats`` forward passes on a random (batch_size, *input_shape) batch.

    ``warmup`` untimed passes run first (allocator, oneDNN/JIT caches); timing uses
    ``time.perf_counter`` and synchronises CUDA around each pass when the model is on a GPU.
    """
    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(f"latency_ms needs repeats >= 1, warmup >= 0, batch_size >= 1; got {repeats}, {warmup}, {batch_size}")
    device, was_training = _device_of(model), model.training
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
