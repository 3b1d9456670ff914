"""Weight matching: permutation alignment of independently trained models before merging.

Ainsworth, Hayase & Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries"
(ICLR 2023), Sec. 3.2 "Weight matching" and Algorithm 1 (PermutationCoordinateDescent); the
reference implementation is ``weight_matching.py`` of github.com/samuela/git-re-basin, whose
``perm_to_axes`` / ``axes_to_perm`` spec this module mirrors.

Permuting the hidden units of layer l of model B (rows of W_l, b_l and columns of W_{l+1})
leaves B's function unchanged. Weight matching picks the permutations that bring B's weights
closest to A's:

    argmin_P Σ_l ‖W_l^A − P_l W_l^B P_{l−1}ᵀ‖²_F  =  argmax_P Σ_l ⟨W_l^A, P_l W_l^B P_{l−1}ᵀ⟩_F

(P_0 and the head's output are the identity; biases add ⟨b_l^A, P_l b_l^B⟩). This sum of
bilinear assignment problems is NP-hard; holding every other permutation fixed, the best P_l is
a linear assignment problem

    argmax_{P_l} ⟨P_l, W_l^A P_{l−1} (W_l^B)ᵀ + (W_{l+1}^A)ᵀ P_{l+1} W_{l+1}^B + b_l^A (b_l^B)ᵀ⟩_F

solved exactly by ``scipy.optimize.linear_sum_assignment``. Algorithm 1 sweeps the layers in
random order until no permutation improves the objective (at most ``max_sweeps`` sweeps).

A permutation ``perms[p]`` is an index tensor: unit i of the permuted B is unit ``perms[p][i]``
of B. After a CNN's Flatten the next Linear's input axis is C blocks of H·W features, one block
per channel; the spec views that weight as (out, C, H·W) so the channel permutation moves
whole blocks. Merging: two models give (1 − α)·θ_A + α·P(θ_B); K > 2 models are each aligned to
the first and averaged uniformly (``alpha`` is then not used).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from slimforge.averaging import average_states
from slimforge.models import Classifier, _ImageInput

# Modules that act on each channel alike, so a channel permutation passes through them unchanged.
_EQUIVARIANT = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Dropout,
                nn.MaxPool2d, nn.AvgPool2d, nn.Flatten)
_CONTAINERS = (Classifier, nn.Sequential, _ImageInput)


class WeightMatchingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["weight_matching"] = "weight_matching"
    max_sweeps: int = Field(default=100, ge=1, description="coordinate-descent sweeps over all permutations, at most")
    alpha: float = Field(default=0.5, ge=0.0, le=1.0,
                         description="two models: weight of the aligned second model, (1−α)·A + α·P(B); "
                                     "with more than two models the aligned models are averaged uniformly")
    seed: int = Field(default=0, description="seed of the generator that orders the layers in each sweep")


@dataclass(frozen=True)
class PermutationSpec:
    """Which permutation acts on which axis of which state-dict tensor.

    ``axes_to_perm[name][axis]`` is the permutation name on that axis of the tensor viewed as
    ``views[name]`` (None: not permuted); ``sizes[p]`` is the number of units permutation p moves.
    """

    axes_to_perm: dict[str, tuple[str | None, ...]]
    views: dict[str, tuple[int, ...]]
    sizes: dict[str, int]

    @property
    def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
        """Permutation name -> every (tensor name, axis) it permutes."""
        out: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for name, perms in self.axes_to_perm.items():
            for axis, p in enumerate(perms):
                if p is not None:
                    out[p].append((name, axis))
        return dict(out)


def _check_supported(model: nn.Module) -> None:
    """One-line error naming each module type that a channel permutation cannot pass through."""
    bad: dict[str, str] = {}
    for name, module in model.named_modules():
        kind = type(module)
        if kind not in (nn.Linear, nn.Conv2d) and not isinstance(module, _CONTAINERS + _EQUIVARIANT):
            bad.setdefault(kind.__name__, name)
        elif kind is nn.Conv2d and module.groups != 1:
            bad.setdefault("grouped Conv2d", name)
    if not isinstance(model, Classifier) or bad:
        found = ", ".join(f"{k} at {n!r}" for k, n in bad.items()) or f"a {type(model).__name__}"
        raise ValueError(f"weight_matching supports MLP and CNN Classifiers (Linear, Conv2d, elementwise "
                         f"activations, pooling, Flatten); unsupported: {found}")


def permutation_spec(model: nn.Module) -> PermutationSpec:
    """The spec of an MLP or CNN Classifier: one permutation per hidden Linear/Conv2d, named after
    the module; the head's output axis is never permuted. Layers run in registration order."""
    _check_supported(model)
    axes: dict[str, tuple[str | None, ...]] = {}
    views: dict[str, tuple[int, ...]] = {}
    sizes: dict[str, int] = {}
    prev: str | None = None  # permutation of the current features' channel axis
    spatial = flat = False  # features are (B, C, H, W) from a conv / were flattened from it
    for name, m in model.named_modules():
        if isinstance(m, nn.Flatten):
            flat = spatial
        if type(m) not in (nn.Linear, nn.Conv2d):
            continue
        if type(m) is nn.Linear and spatial and not flat:
            raise ValueError(f"weight_matching: Linear {name!r} acts on conv features that were not flattened")
        out = None if name == "head" else name
        shape = tuple(m.weight.shape)  # Linear (out, in), Conv2d (out, in, kh, kw)
        if flat and prev is not None:  # (out, C·H·W) viewed as (out, C, H·W): channels move as blocks
            if shape[1] % sizes[prev]:
                raise ValueError(f"weight_matching: {name!r} has {shape[1]} inputs, not a multiple of "
                                 f"{sizes[prev]} channels")
            shape = (shape[0], sizes[prev], shape[1] // sizes[prev])
        axes[f"{name}.weight"], views[f"{name}.weight"] = (out, prev, *[None] * (len(shape) - 2)), shape
        if m.bias is not None:
            axes[f"{name}.bias"], views[f"{name}.bias"] = (out,), (shape[0],)
        if out is not None:
            sizes[out] = shape[0]
        prev, spatial, flat = out, type(m) is nn.Conv2d, False
    return PermutationSpec(axes, views, sizes)


def _permuted(spec: PermutationSpec, perms: dict[str, Tensor], name: str, w: Tensor,
              skip_axis: int | None = None) -> Tensor:
    """Tensor ``name`` in its spec view with every permutation applied except on ``skip_axis``."""
    w = w.reshape(spec.views[name])
    for axis, p in enumerate(spec.axes_to_perm[name]):
        if p is not None and axis != skip_axis:
            w = w.index_select(axis, perms[p])
    return w


def apply_permutation(spec: PermutationSpec, perms: dict[str, Tensor], state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A new state dict with ``perms`` applied; tensors the spec does not name are kept as they are."""
    return {name: _permuted(spec, perms, name, w).reshape(w.shape) if name in spec.axes_to_perm else w
            for name, w in state.items()}


def assignment_gain(spec: PermutationSpec, perms: dict[str, Tensor], p: str, state_a: dict[str, Tensor],
                    state_b: dict[str, Tensor]) -> Tensor:
    """(n, n) float64: entry (i, j) is the inner product that putting B's unit j at A's unit i adds
    to Σ ⟨W^A, P W^B Pᵀ⟩, with every other permutation held at ``perms``."""
    n = spec.sizes[p]
    gain = torch.zeros(n, n, dtype=torch.float64)
    for name, axis in spec.perm_to_axes[p]:
        a = state_a[name].reshape(spec.views[name]).movedim(axis, 0).reshape(n, -1).double()  # (n, rest)
        b = _permuted(spec, perms, name, state_b[name], skip_axis=axis).movedim(axis, 0).reshape(n, -1).double()
        gain += a @ b.T
    return gain


def match_weights(spec: PermutationSpec, state_a: dict[str, Tensor], state_b: dict[str, Tensor],
                  max_sweeps: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Permutations of B's units that maximise Σ_l ⟨W_l^A, P_l W_l^B P_{l−1}ᵀ⟩ (Algorithm 1).

    Each sweep visits the permutations in an order drawn from ``generator`` and replaces one only
    when its assignment strictly improves the objective, so the loop ends after a sweep that
    changes nothing (or after ``max_sweeps``). Returns {permutation name: (n,) int64 indices}.
    """
    perms = {p: torch.arange(n) for p, n in spec.sizes.items()}
    names = list(perms)
    rows = torch.arange(max(spec.sizes.values(), default=0))
    for _ in range(max_sweeps):
        changed = False
        for i in torch.randperm(len(names), generator=generator).tolist():
            p = names[i]
            gain = assignment_gain(spec, perms, p, state_a, state_b)
            _, cols = linear_sum_assignment(gain.numpy(), maximize=True)  # rows come back as 0..n−1
            new = torch.from_numpy(cols).long()
            r = rows[: len(new)]
            old_score, new_score = gain[r, perms[p]].sum(), gain[r, new].sum()
            if new_score > old_score + 1e-12 * gain.abs().max() * len(new):  # beyond float64 round-off
                perms[p], changed = new, True
        if not changed:
            break
    return perms


def weighted_average(states: list[dict[str, Tensor]], weights: list[float]) -> dict[str, Tensor]:
    """Σ_k w_k·θ_k over floating-point tensors; other tensors (integer buffers) from the first state."""
    first = states[0]
    return {name: sum(w * s[name] for w, s in zip(weights, states, strict=True)).to(t.dtype)
            if t.is_floating_point() else t.clone() for name, t in first.items()}


def align_and_merge(spec: PermutationSpec, states: list[dict[str, Tensor]], cfg: WeightMatchingConfig,
                    generator: torch.Generator) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """Align every model to the first, then merge: (1 − α)·θ_1 + α·P(θ_2) for two models, the
    uniform mean of the aligned models for more. Returns (merged state, one permutation dict per
    model; the first model's is the identity)."""
    if len(states) < 2:
        raise ValueError(f"weight_matching: merging needs at least 2 models, got {len(states)}")
    perms = [{p: torch.arange(n) for p, n in spec.sizes.items()}]
    perms += [match_weights(spec, states[0], s, cfg.max_sweeps, generator) for s in states[1:]]
    aligned = [apply_permutation(spec, p, s) for p, s in zip(perms, states, strict=True)]
    if len(states) > 2:
        return average_states(aligned), perms
    return weighted_average(aligned, [1 - cfg.alpha, cfg.alpha]), perms
