"""Full or head-only fine-tuning of the base model on one task.

Task models exist for merging (task arithmetic, Ilharco et al. ICLR 2023): each keeps the
base backbone's parameter names, and its head starts as a copy of the base head.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from slimforge.models import Classifier
from slimforge.training import fit
from tasks.finetune.config import FinetuneConfig


def finetune(base: Classifier, x: Tensor, y: Tensor, cfg: FinetuneConfig, g: torch.Generator,
             label: str = "finetune") -> Classifier:
    """A fine-tuned copy of ``base``; ``base`` itself is left untouched."""
    model = copy.deepcopy(base)
    params = list(model.head.parameters()) if cfg.method == "head" else None
    fit(model, x, y, cfg.fit_config(), g, params=params, label=label)
    return model
