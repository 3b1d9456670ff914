"""What one forward pass costs: FLOPs per example and peak memory, for float and packed models.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add is 2 FLOPs;
matmuls, convolutions and attention only: bias adds, norms and activations count 0). The packed
low-bit ops of the quantize stage, unknown to the counter, are given the formula of the dense
matmul they stand for (``custom_mapping``), and fused attention its own; a layer that launches a
Triton kernel (invisible to the counter) is counted by a forward hook. Peak memory is what one
forward allocates beyond what was live before it: on CUDA from the allocator's peak statistic,
on CPU by replaying torch.profiler's allocation events.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from itertools import accumulate

import torch
from torch import Tensor, nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import kernels
from tasks.evaluate.harness import device_of


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
        return kernels.resolve_kernel(kernel, device_of(module)) == "triton"
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
    device, was_training = device_of(model), model.training
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
    device, was_training = device_of(model), model.training
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


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 sent to /dev/null: torch 2.13's kineto prints two "USDT: profiler_start/
    stop" lines from C++ on every profile, one pair per measured model. Only the profiler's start
    and stop run inside this; the forward pass keeps its stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _cpu_peak(model: nn.Module, x: Tensor) -> int:
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        _output = model(x)  # kept alive until the peak is read: the output counts
    finally:
        with _quiet_stderr():
            prof.stop()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]  # +alloc / -free bytes
    return max(accumulate((n for _, n in sorted(events, key=lambda e: e[0])), initial=0))  # peak of live bytes
