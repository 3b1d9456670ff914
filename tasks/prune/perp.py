"""PERP recovery with masked LoRA adapters (``recovery_params: perp_lora``).

Zimmer, Andoni, Spiegel & Pokutta, "PERP: Rethinking the Prune-Retrain Paradigm in the Era of
LLMs" (arXiv 2312.15230). After pruning, retrain only the biases and normalisation parameters
plus LoRA adapters (Hu et al., ICLR 2022) on the pruned layers. A plain LoRA update BA is dense
and would undo the sparsity when merged; the paper's MaskLoRA multiplies it by the mask:

    W_eff = W + (α/r)·(B A) ⊙ M,    A ∈ R^{r×fan_in}, B ∈ R^{out×r}, B = 0 at the start,

so the forward is the pruned model's at step 0 and merging (W ← W_eff) keeps exactly the mask.

Checked against the paper's code (github.com/ZIB-IOL/PERP, ``customLayers.MaskLoRALayer``,
``peft_methods.SelectivePEFT``): the masked update and its merge; A and B initialised as LoRA
(A Kaiming-uniform with a = √5, B = 0); biases and LayerNorm parameters trained beside the
adapters, the base weight frozen. The paper's ScaLE variant (W ⊙ BA) is not offered.

Reconstructed:
- The mask is the pruning method's keep-mask, not ``W != 0`` as in the paper's code; a layer
  the method did not mask (or a dense structured result) gets an all-True mask, i.e. plain
  LoRA, which keeps its shape.
- Every Linear and Conv2d layer gets an adapter, the head and the attention ``out_proj``
  included: the adapter is a ``torch.nn.utils.parametrize`` parametrization of ``weight``, so
  code that reads the weight directly (``F.multi_head_attention_forward``) sees W_eff too. A
  conv weight (O, I, kh, kw) is adapted as the matrix (O, I·kh·kw), the paper code's reshape.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from slimforge.training import FitConfig, fit
from tasks.prune.common import perp_parameters, prunable


class MaskedLoRA(nn.Module):
    """The parametrization W ↦ W + (α/r)·(B A) ⊙ M of one weight; B = 0 at the start."""

    def __init__(self, weight: Tensor, mask: Tensor, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        out, fan_in = weight.shape[0], math.prod(weight.shape[1:])
        like = {"dtype": weight.dtype, "device": weight.device}
        A = torch.empty(rank, fan_in, **like)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(A)  # (r, fan_in)
        self.lora_B = nn.Parameter(torch.zeros(out, rank, **like))  # (out, r)
        self.register_buffer("mask", mask.to(**like))  # 1.0 kept, 0.0 pruned; the weight's shape
        self.scaling = alpha / rank
        self.parameter_order: list[str] = []  # the adapted module's parameter names, set when registered
        self.weight_requires_grad = True  # the base weight's flag before it was frozen

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.scaling * (self.lora_B @ self.lora_A).view_as(weight) * self.mask


def add_masked_adapters(model: nn.Module, masks: dict[str, Tensor] | None, rank: int, alpha: float,
                        generator: torch.Generator) -> list[nn.Parameter]:
    """Parametrize every prunable weight with a MaskedLoRA, in place; returns the adapters' A, B.
    The base weights are frozen (``requires_grad`` off) until ``merge_masked_adapters``."""
    masks = masks or {}
    modules = dict(model.named_modules())
    params: list[nn.Parameter] = []
    for name, weight in prunable(model).items():
        mask = masks.get(name, torch.ones_like(weight, dtype=torch.bool))
        module_name, _, attr = name.rpartition(".")  # "weight", or an attention's "in_proj_weight"
        module = modules[module_name]
        adapter = MaskedLoRA(weight.detach(), mask, rank, alpha, generator)
        adapter.parameter_order, adapter.weight_requires_grad = list(module._parameters), weight.requires_grad
        weight.requires_grad_(False)
        parametrize.register_parametrization(module, attr, adapter)
        params += [adapter.lora_A, adapter.lora_B]
    return params


@torch.no_grad()
def merge_masked_adapters(model: nn.Module) -> None:
    """Fold every adapter into its weight (W ← W + (α/r)·(B A) ⊙ M) and remove it, in place: the
    model has its original classes, parameter objects, state-dict order and grad flags again."""
    for module in list(model.modules()):  # a list: removal edits the module tree
        for attr in list(getattr(module, "parametrizations", {})):
            adapter = module.parametrizations[attr][0]
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
            # removal re-registers the weight last; restore the order so the state dict (and the
            # artifact written from it) is laid out exactly as the un-adapted model's
            module._parameters = {k: module._parameters[k] for k in adapter.parameter_order}
            getattr(module, attr).requires_grad_(adapter.weight_requires_grad)


def recover_perp_lora(model: nn.Module, masks: dict[str, Tensor] | None, x: Tensor, y: Tensor, fit_cfg: FitConfig,
                      rank: int, alpha: float, generator: torch.Generator) -> list[float]:
    """PERP with MaskLoRA: train biases, norms and masked adapters on (x, y), then merge.
    Adapter A matrices are drawn from ``generator`` before training; returns the epoch losses."""
    params = perp_parameters(model)
    params += add_masked_adapters(model, masks, rank, alpha, generator)
    losses = fit(model, x, y, fit_cfg, generator, params=params, label="prune recovery (perp_lora)")
    merge_masked_adapters(model)
    return losses
