"""Full, head-only or LoRA fine-tuning of the base model on one task.

Task models exist for merging (task arithmetic, Ilharco et al. ICLR 2023): each keeps the
base backbone's parameter names, and its head starts as a copy of the base head. LoRA
(Hu et al. ICLR 2022; EVA init, Paischer et al. 2024) trains adapters on the backbone's
Linear layers plus the whole head, then folds the adapters back, so its task model is as
dense and mergeable as the others (see ``lora.py``, ``eva.py``).
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import Tensor, nn

from slimforge.data import batches
from slimforge.models import Classifier
from slimforge.training import fit
from tasks.finetune.config import FinetuneConfig
from tasks.finetune.eva import eva_init
from tasks.finetune.lora import add_adapters, merge_adapters


def finetune(base: Classifier, x: Tensor, y: Tensor, cfg: FinetuneConfig, g: torch.Generator,
             label: str = "finetune") -> Classifier:
    """A fine-tuned copy of ``base``; ``base`` itself is left untouched."""
    return finetune_with_history(base, x, y, cfg, g, label)[0]


def finetune_with_history(
    base: Classifier, x: Tensor, y: Tensor, cfg: FinetuneConfig, g: torch.Generator,
    label: str = "finetune",
) -> tuple[Classifier, list[float]]:
    """``finetune`` plus the mean training loss of each epoch (the loss curve)."""
    model = copy.deepcopy(base)
    if cfg.method == "lora":
        params = _prepare_lora(model, x, cfg, g)
    else:
        params = list(model.head.parameters()) if cfg.method == "head" else None
    history = fit(model, x, y, cfg.fit_config(), g, params=params, label=label)
    if cfg.method == "lora":
        merge_adapters(model).requires_grad_(True)  # a plain dense model, like the base
    return model, history


def _prepare_lora(model: nn.Module, x: Tensor, cfg: FinetuneConfig,
                  g: torch.Generator) -> list[nn.Parameter]:
    """Add adapters to ``model`` in place (EVA calibrates on ``x`` first); the params to train."""
    ranks, init_A = cfg.lora_rank, None
    if cfg.lora_init == "eva":
        order = batches(len(x), cfg.batch_size, g)  # shuffled with g, like fit's epochs
        calib = (x[idx] for idx in itertools.islice(order, cfg.eva_batches))
        ranks, init_A = eva_init(model, cfg.lora_targets, calib, cfg.lora_rank, cfg.eva_rho)
    return add_adapters(model, cfg.lora_targets, ranks, cfg.lora_alpha, init_A, g)
