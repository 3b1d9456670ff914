"""finetune: per-task fine-tunes of the trained base (fan-out)."""

from tasks.finetune.config import FinetuneConfig, TaskSpec
from tasks.finetune.finetune import finetune, finetune_with_history

__all__ = ["FinetuneConfig", "TaskSpec", "finetune", "finetune_with_history"]
