"""LoRA adapters on nn.Linear layers: add, train, fold back.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022), Eq. 3:
``h = W0 x + ΔW x = W0 x + (α/r)·B A x`` with ``A ∈ R^{r×d_in}``, ``B ∈ R^{d_out×r}``;
A starts random, B starts at zero (so ΔW = 0 at step 0) and W0 (and its bias) stay frozen.
Random A follows the reference implementations (loralib / PEFT):
``kaiming_uniform_(A, a=√5)``, i.e. U(−1/√d_in, 1/√d_in). After training the update is folded
into the weight (``W = W0 + (α/r)·BA``, Sec. 4.1 "no additional inference latency"), so a
LoRA task model is a plain dense ``Classifier`` with exactly the base's parameter names —
what the merge stage needs to form task vectors.

Target matching: each pattern in ``targets`` is an fnmatch pattern (``fnmatch.fnmatchcase``)
over qualified module names as ``model.named_modules()`` spells them; ``*`` also crosses dots,
so ``"backbone.*"`` matches ``backbone.1`` and ``backbone.body.4``, and an exact name matches
only itself. Only nn.Linear layers count. Never adapted: the head (trained fully in every
fine-tune method) and the ``out_proj`` of an nn.MultiheadAttention, whose weight
``F.multi_head_attention_forward`` reads directly, bypassing any wrapper's forward.
"""

from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HEAD = "head"


class LoRALinear(nn.Module):
    """``base(x) + (alpha/rank)·B(A x)`` with ``base`` frozen; B = 0 at start."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, init_A: Tensor | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        d_out, d_in = base.weight.shape
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        like = {"dtype": base.weight.dtype, "device": base.weight.device}
        if init_A is None:
            A = torch.empty(rank, d_in, **like)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        elif tuple(init_A.shape) != (rank, d_in):
            raise ValueError(f"init_A has shape {tuple(init_A.shape)}, expected {(rank, d_in)}")
        else:
            A = init_A.detach().to(**like).clone()
        self.lora_A = nn.Parameter(A)  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, **like))  # (d_out, r)

    def forward(self, x: Tensor) -> Tensor:  # (..., d_in) -> (..., d_out)
        return self.base(x) + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear with weight ``W0 + (alpha/r)·BA`` and the base's bias."""
        d_out, d_in = self.base.weight.shape
        w = self.base.weight
        out = nn.Linear(d_in, d_out, bias=self.base.bias is not None,
                        device=w.device, dtype=w.dtype)
        out.weight.copy_(w + self.scaling * (self.lora_B @ self.lora_A))  # (d_out, d_in)
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out


def adaptable_linears(model: nn.Module) -> list[str]:
    """Names of the nn.Linear layers LoRA may wrap (not the head, not attention out_proj)."""
    skip = {f"{name}.out_proj" if name else "out_proj" for name, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention)}
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name not in skip
            and name != HEAD and not name.startswith(HEAD + ".")]


def match_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Adaptable Linear layer names matched by any pattern, in module order.

    Raises ValueError naming a pattern that matches no adaptable Linear layer.
    """
    names = adaptable_linears(model)
    for pattern in targets:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"lora target {pattern!r} matches no Linear layer that can be adapted "
                             f"(the head is always trained fully); Linear layers: {names}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in targets)]


def _layer_ranks(names: list[str], rank: int | dict[str, int]) -> dict[str, int]:
    if isinstance(rank, int):
        return {n: rank for n in names}
    missing, extra = set(names) - set(rank), set(rank) - set(names)
    if missing or extra:
        raise ValueError(f"per-layer ranks must name exactly the targeted layers {names}; "
                         f"missing {sorted(missing)}, not targeted {sorted(extra)}")
    if any(r < 0 for r in rank.values()):
        raise ValueError(f"per-layer ranks must be >= 0, got {rank}")
    return dict(rank)


def add_adapters(model: nn.Module, targets: list[str], rank: int | dict[str, int], alpha: float,
                 init_A: dict[str, Tensor] | None = None,
                 g: torch.Generator | None = None) -> list[nn.Parameter]:
    """Wrap the targeted Linear layers in LoRALinear, in place; returns the params to train.

    ``rank`` is one rank for every layer or a dict name -> rank (0 = leave that layer
    alone). ``init_A`` gives A for some layers (its rows must equal the layer's rank);
    the others get the random init drawn from ``g``. Every parameter outside the head
    is frozen; the returned list is the adapters' A and B followed by the head's params.
    """
    ranks = _layer_ranks(match_targets(model, targets), rank)
    init_A = init_A or {}
    unknown = set(init_A) - {n for n, r in ranks.items() if r > 0}
    if unknown:
        raise ValueError(f"init_A names layers that get no adapter: {sorted(unknown)}")
    model.requires_grad_(False)
    head = model.get_submodule(HEAD).requires_grad_(True)
    params: list[nn.Parameter] = []
    for name, r in ranks.items():
        if r == 0:
            continue
        adapter = LoRALinear(model.get_submodule(name), r, alpha, init_A.get(name), g)
        _replace(model, name, adapter)
        params += [adapter.lora_A, adapter.lora_B]
    return params + list(head.parameters())


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear back into a plain nn.Linear, in place; returns ``model``."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            _replace(model, name, m.merged())
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    # setattr on an existing child keeps its slot in _modules, so state-dict order is kept
    setattr(model.get_submodule(parent) if parent else model, child, module)
