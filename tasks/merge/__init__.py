"""merge: combine the task models (task arithmetic, TIES, DARE; lambda chosen on validation data)."""

from tasks.merge.task_arithmetic import TaskVectorConfig, merge_task_vectors, task_vectors

__all__ = ["TaskVectorConfig", "merge_task_vectors", "task_vectors"]
