"""merge: combine the task models (task arithmetic, lambda chosen on validation data)."""

from tasks.merge.task_arithmetic import TaskArithmeticConfig, merge_task_vectors, task_vectors

__all__ = ["TaskArithmeticConfig", "merge_task_vectors", "task_vectors"]
