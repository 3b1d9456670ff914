"""2:4 semi-structured sparse Linear layers on sparse tensor cores.

Mishra et al., "Accelerating Sparse Deep Neural Networks" (arXiv 2104.08378, 2021): an Ampere+
GPU multiplies a weight with at most 2 nonzeros in every 4 consecutive inputs at up to twice
the dense rate, storing only the kept values plus 2-bit positions. ``tasks/prune/nm.py`` makes
such weights (groups run along the input dim of a Linear (O, I) weight); this module runs them.

Two implementations with one signature, picked by ``kernel: auto | torch | semi`` and resolved
in ``resolve_sparse24_kernel`` only:

- ``"torch"``: the reference (the spec): the dense masked weight through ``F.linear``.
- ``"semi"``: the weight as torch's ``SparseSemiStructuredTensor`` (cuSPARSELt when torch has
  it, else CUTLASS), in float16 (or the layer's own bfloat16/float16), run by ``F.linear``.
  Needs CUDA with compute capability >= 8.0; a ValueError says so otherwise.
- ``"auto"``: ``"semi"`` where ``semi_structured_supported``, else ``"torch"``.

Shape limits, from torch 2.13's ``torch/sparse/semi_structured.py`` (sparse operand = the
(O, I) weight; both dims a multiple of the minimum): cuSPARSELt fp16/bf16 (16, 16), int8 and
fp8 (32, 32); CUTLASS fp16/bf16 (32, 64), int8 (16, 128), fp32 (32, 32). The dense operand
(the activations) is zero-padded by torch itself to multiples of 8 (fp16/bf16). Here O is
padded with zero rows (sliced off the output), so only I must fit; a layer whose I does not
is refused with the reason and stays dense in ``sparsify_24``.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Sparse24Kernel = Literal["auto", "torch", "semi"]
SPARSE24_KERNELS: tuple[str, ...] = get_args(Sparse24Kernel)
SEMI_DTYPES = (torch.float16, torch.bfloat16)  # what the semi path computes in


def is_2to4(weight: Tensor) -> bool:
    """True when ``weight`` is 2-D and every 4 consecutive inputs of a row hold at most 2 nonzeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    groups = (weight.detach() != 0).reshape(weight.shape[0], -1, 4)  # (O, I/4, 4)
    return bool((groups.sum(-1) <= 2).all())


def semi_structured_supported(device: torch.device | str) -> bool:
    """True on a CUDA device of compute capability >= 8.0 with torch's semi-structured sparsity
    (and a backend for it: cuSPARSELt, or CUTLASS on an 8.x device)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False
    capability = torch.cuda.get_device_capability(device)
    # torch's CUTLASS fallback is built for sm_8x only; cuSPARSELt covers sm_80 and later
    return capability >= (8, 0) and (torch.backends.cusparselt.is_available() or capability[0] == 8)


def resolve_sparse24_kernel(kernel: Sparse24Kernel, device: torch.device | str) -> Literal["torch", "semi"]:
    """Turn a ``kernel`` setting into the implementation that will run on ``device``."""
    if kernel not in SPARSE24_KERNELS:
        raise ValueError(f"kernel: {kernel!r} is not one of {', '.join(SPARSE24_KERNELS)}")
    if kernel == "torch":
        return "torch"
    supported = semi_structured_supported(device)
    if kernel == "semi" and not supported:
        raise ValueError(f"kernel: 'semi' needs a CUDA device of compute capability >= 8.0 with "
                         f"torch.sparse.to_sparse_semi_structured; got {torch.device(device)}. "
                         "Use kernel: torch or auto")
    return "semi" if supported else "torch"


def _backend():
    """torch's semi-structured class: cuSPARSELt where this torch build has it, else CUTLASS.
    Chosen here rather than through torch's ``_FORCE_CUTLASS`` class flag (a global)."""
    if torch.backends.cusparselt.is_available():
        return torch.sparse.SparseSemiStructuredTensorCUSPARSELT
    return torch.sparse.SparseSemiStructuredTensorCUTLASS


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The semi path's dtype: the layer's own if half precision, else float16."""
    return dtype if dtype in SEMI_DTYPES else torch.float16


def semi_structured_refusal(weight: Tensor) -> str | None:
    """Why ``weight`` (O, I) cannot run on the semi path, or None when it can (O is padded)."""
    dtype = _compute_dtype(weight.dtype)
    limits = _backend()._DTYPE_SHAPE_CONSTRAINTS[dtype]
    if weight.shape[1] % limits.sparse_min_cols:
        return (f"{weight.shape[1]} inputs is not a multiple of {limits.sparse_min_cols}, which "
                f"torch's {_backend().BACKEND} backend needs for {dtype}")
    return None


def _not_2to4(w: Tensor) -> str:
    """What breaks 2:4 in a weight that ``is_2to4`` refused."""
    if w.dim() != 2 or w.shape[1] % 4:
        return f"its {w.shape[-1]} inputs are not a multiple of 4"
    crowded = int(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) > 2).sum())
    return f"{crowded} groups of 4 inputs hold more than 2 nonzeros"


class Sparse24Linear(nn.Module):
    """A Linear layer whose weight is 2:4 sparse, run by the reference or the semi-structured path.

    ``kernel`` here is already resolved ("torch" or "semi"); build with ``from_linear``.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, kernel: Literal["torch", "semi"]):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.kernel = kernel
        if kernel == "torch":
            self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)  # (O, I) dense, zeros kept
            self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
            return
        dtype, backend = _compute_dtype(weight.dtype), _backend()
        pad = (-self.out_features) % backend._DTYPE_SHAPE_CONSTRAINTS[dtype].sparse_min_rows
        w = F.pad(weight.detach().to(dtype), (0, 0, 0, pad)).contiguous()  # (O + pad, I); zero rows are 2:4
        self.weight = nn.Parameter(backend.from_dense(w), requires_grad=False)
        # cuSPARSELt fuses the bias only in the weight's dtype
        b = None if bias is None else F.pad(bias.detach().to(dtype), (0, pad))
        self.bias = None if b is None else nn.Parameter(b, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: Sparse24Kernel = "auto", name: str = "linear") -> Sparse24Linear:
        """The layer ``linear`` as a Sparse24Linear; ValueError naming ``name`` when its weight is not
        2:4 or the semi path cannot take its shape."""
        w = linear.weight.detach()
        if not is_2to4(w):
            raise ValueError(f"sparse24: layer {name!r} {tuple(w.shape)} is not 2:4 sparse ({_not_2to4(w)}); "
                             "prune it with prune.method: nm (n: 2, m: 4) or leave it dense")
        impl = resolve_sparse24_kernel(kernel, w.device)
        if impl == "semi" and (reason := semi_structured_refusal(w)) is not None:
            raise ValueError(f"sparse24: layer {name!r} {tuple(w.shape)} cannot run semi-structured: {reason}")
        return cls(w, linear.bias, impl)

    def forward(self, x: Tensor) -> Tensor:  # (..., I) -> (..., O)
        if self.kernel == "torch":
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.weight.dtype)  # (B, I); the sparse mm is 2-D only
        y = F.linear(x2, self.weight, self.bias)[:, : self.out_features]  # (B, O + pad) -> (B, O)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


def sparsify_24(model: nn.Module, kernel: Sparse24Kernel = "auto") -> list[str]:
    """Replace, in place, every ``nn.Linear`` whose weight is 2:4 (and fits the semi path when
    that is the one chosen) by a Sparse24Linear; returns the names replaced.

    With ``auto`` only layers that would run semi-structured are replaced: elsewhere the
    reference is the dense layer itself, so on CPU nothing changes. Subclasses of nn.Linear
    (nn.MultiheadAttention's ``out_proj``, whose weight the attention reads directly) are left.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        if not name or type(module) is not nn.Linear or not is_2to4(module.weight):
            continue
        impl = resolve_sparse24_kernel(kernel, module.weight.device)
        if (kernel == "auto" and impl == "torch") or (impl == "semi" and semi_structured_refusal(module.weight)):
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, Sparse24Linear.from_linear(module, impl, name))
        replaced.append(name)
    return replaced
