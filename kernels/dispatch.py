"""The one place a ``kernel: auto | torch | triton`` setting becomes an implementation.

Every op in ``kernels/`` calls ``resolve_kernel`` with its input's device; see the package
docstring for the rules.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal, get_args

import torch

Kernel = Literal["auto", "torch", "triton"]
KERNELS: tuple[str, ...] = get_args(Kernel)


def triton_available() -> bool:
    """True when the triton package is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_kernel(kernel: Kernel, device: torch.device | str) -> Literal["torch", "triton"]:
    """Turn a ``kernel`` setting into the implementation that will run on ``device``."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: {kernel!r} is not one of {', '.join(KERNELS)}")
    device = torch.device(device)
    if kernel == "torch":
        return "torch"
    if kernel == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise ValueError("kernel: 'triton' was requested but triton is not installed "
                         "(pip install 'slimforge[triton]'), or use kernel: torch")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"kernel: 'triton' needs a CUDA tensor; got device {device.type!r}. "
                         "Set TRITON_INTERPRET=1 to run it through Triton's CPU interpreter, "
                         "or use kernel: torch")
    return "triton"


def offload_device(kernel: Kernel, device: torch.device | str) -> torch.device:
    """Where an op on tensors held on ``device`` should run: a CUDA GPU when they sit on the CPU,
    ``kernel`` allows Triton (auto or triton) and a GPU and Triton are present, else ``device``.
    For ops that stream host tensors (a merge read from disk) and gain more from the GPU's
    bandwidth than they lose in transfers."""
    device = torch.device(device)
    if device.type == "cpu" and kernel != "torch" and torch.cuda.is_available() and triton_available():
        return torch.device("cuda")
    return device
