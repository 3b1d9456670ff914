"""Task-vector merging: θ = θ₀ + λ·combine(sparsify(τ_1), …, sparsify(τ_K)), τ_k = θ_k − θ₀.

Task arithmetic, TIES and DARE are settings of this one merge (as mergekit's
``GeneralizedTaskArithmeticMerge``), chosen by ``method``:

- ``task_arithmetic`` — Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023):
  no sparsification, combine = Σ_k τ_k.
- ``ties`` — trim each τ_k to its top ``density`` share by magnitude, elect signs, disjoint
  mean (``tasks.merge.ties``).
- ``dare`` — drop entries with probability ``drop`` and rescale (``tasks.merge.dare``), then
  Σ_k (DARE before task arithmetic) or, with ``consensus: ties``, the TIES sign election and
  disjoint mean (mergekit's ``dare_ties``).

λ (and DAREx-q's q) are grids searched on validation data by the stage. Task vectors are
taken over the shared backbone only; per-task heads are never merged. Every function works
tensor by tensor (``merge_tensor``), so a merge streamed from disk runs the same code. The
sparsify-and-combine of one tensor is ``kernels.merge.task_vector_merge``: a torch reference, or
one fused Triton pass over the K deltas on a GPU (``kernel``), with the same bits.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from torch import Tensor

from kernels.dispatch import Kernel, offload_device
from kernels.merge import task_vector_merge
from tasks.merge.dare import tensor_seed
from tasks.merge.ties import keep_threshold

_ONLY = {"density": ("ties",), "trim_scope": ("ties",), "drop": ("dare",), "rescales": ("dare",),
         "consensus": ("dare",)}


class TaskVectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["task_arithmetic", "ties", "dare"] = "task_arithmetic"
    lambdas: list[float] = Field(default=[round(0.1 * i, 1) for i in range(1, 11)], min_length=1,
                                 description="grid of scaling coefficients λ searched on validation data")
    density: float = Field(default=0.2, gt=0, le=1, description="ties: share of each task vector's entries kept")
    trim_scope: Literal["model", "tensor"] = Field(
        default="model", description="ties: rank magnitudes over the whole task vector or per tensor")
    drop: float = Field(default=0.9, ge=0, lt=1, description="dare: probability p of dropping a delta entry")
    rescales: list[float] | None = Field(
        default=None, description="dare: DAREx-q grid of q (survivors divided by q, not 1 − p)")
    consensus: Literal["none", "ties"] = Field(
        default="none", description="dare: 'ties' adds the TIES sign election and disjoint mean")
    seed: int = Field(default=0, description="dare: seed of the drop masks")
    kernel: Kernel = Field(default="auto", description="merge kernel: torch reference, or the fused Triton "
                                                       "kernel (auto: the Triton kernel on a GPU when there is "
                                                       "one, tensors read into host memory included)")

    @model_validator(mode="after")
    def _method_fields(self) -> TaskVectorConfig:
        changed = [f"{f}={getattr(self, f)!r}" for f in self._unused() if
                   getattr(self, f) != type(self).model_fields[f].get_default(call_default_factory=True)]
        if changed:
            raise ValueError(f"{', '.join(changed)}: unused with method {self.method!r} "
                             f"({', '.join(f'{f} needs {m[0]}' for f, m in _ONLY.items())})")
        if self.rescales is not None and (not self.rescales or min(self.rescales) <= 0):
            raise ValueError(f"rescales: DAREx-q's q must be positive, got {self.rescales}")
        return self

    @model_serializer(mode="wrap")
    def _drop_unused(self, handler: SerializerFunctionWrapHandler) -> dict:
        unused = set(self._unused())
        return {k: v for k, v in handler(self).items() if k not in unused}

    def _unused(self) -> tuple[str, ...]:
        unused = tuple(f for f, methods in _ONLY.items() if self.method not in methods)
        return unused + (("seed",) if self.method != "dare" else ())

    @property
    def uses_ties(self) -> bool:
        return self.method == "ties" or self.consensus == "ties"


def task_vectors(base: dict[str, Tensor], finetuned: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """tau_k = theta_k - theta_0 for every tensor of ``base``; missing or mismatched tensors raise."""
    out = []
    for k, theta in enumerate(finetuned):
        tau = {}
        for name, w0 in base.items():
            if name not in theta:
                raise ValueError(f"merge: task model {k} has no tensor {name!r}")
            if theta[name].shape != w0.shape:
                raise ValueError(f"merge: tensor {name!r} of task model {k} has shape "
                                 f"{tuple(theta[name].shape)}, base has {tuple(w0.shape)}")
            tau[name] = theta[name] - w0
        out.append(tau)
    return out


def trim_thresholds(taus: list[dict[str, Tensor]], cfg: TaskVectorConfig) -> list[float] | None:
    """TIES with ``trim_scope: model``: each task's keep threshold over its whole task vector."""
    if cfg.method != "ties" or cfg.trim_scope != "model":
        return None
    return [keep_threshold(torch.cat([t.abs().flatten() for t in tau.values() if t.is_floating_point()]),
                           cfg.density) for tau in taus]


def merge_tensor(name: str, w0: Tensor, deltas: list[Tensor], lam: float, cfg: TaskVectorConfig,
                 thresholds: list[float] | None = None, rescale: float | None = None, offset: int = 0) -> Tensor:
    """One merged tensor θ₀ + λ·combine(sparsify(τ_k)); non-float tensors (buffers) stay θ₀'s.

    ``thresholds`` are ``trim_thresholds`` (model-scope TIES); ``rescale`` is DAREx-q's q;
    ``offset`` is the flat index of w0's first entry when w0 is a block of rows of tensor ``name``
    (DARE's masks are drawn per flat index). The result has the promoted dtype of w0 and the deltas.
    """
    if not w0.is_floating_point():
        return w0.clone()
    thr, drop, seeds, q = None, 0.0, None, None
    if cfg.method == "ties":
        thr = torch.tensor([thresholds[k] if thresholds is not None else keep_threshold(d.abs().flatten(), cfg.density)
                            for k, d in enumerate(deltas)], dtype=torch.float32)
    elif cfg.method == "dare":
        drop, q = cfg.drop, rescale
        seeds = torch.tensor([tensor_seed(cfg.seed, k, name) for k in range(len(deltas))], dtype=torch.int64)
    dtype = w0.dtype
    for d in deltas:
        dtype = torch.promote_types(dtype, d.dtype)
    device = offload_device(cfg.kernel, w0.device)  # host tensors go through the GPU kernel when there is one
    stacked = torch.stack([d.to(device, dtype) for d in deltas])  # (K, *w0.shape)
    merged = task_vector_merge(w0.to(device), stacked, lam, thr, drop, seeds, q, cfg.uses_ties, offset,
                               kernel=cfg.kernel)
    return merged.to(w0.device)


def merge_task_vectors(base: dict[str, Tensor], taus: list[dict[str, Tensor]], lam: float,
                       cfg: TaskVectorConfig | None = None, rescale: float | None = None) -> dict[str, Tensor]:
    """θ₀ + λ·combine(sparsify(τ_k)) tensor by tensor; plain task arithmetic without ``cfg``."""
    cfg = cfg or TaskVectorConfig()
    thresholds = trim_thresholds(taus, cfg)
    return {name: merge_tensor(name, w0, [tau[name] for tau in taus], lam, cfg, thresholds, rescale)
            for name, w0 in base.items()}
