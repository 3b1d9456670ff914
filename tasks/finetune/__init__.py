"""finetune: per-task fine-tunes of the trained base (fan-out)."""

from tasks.finetune.config import FinetuneConfig, TaskSpec
from tasks.finetune.finetune import finetune

__all__ = ["FinetuneConfig", "TaskSpec", "finetune"]
