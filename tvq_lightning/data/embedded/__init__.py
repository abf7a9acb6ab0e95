"""The embedded multi-task benchmark: procedurally generated, offline, deterministic per seed."""
from .generate import (
           GENERATOR_VERSION,
           SPLIT_SIZES,
           TASKS_VERSION,
           caption_pairs,
           task_split,
           to_tensor,
)
from .tasks import TASK_NAMES, TASKS, TaskSpec
from .vocab import vocabulary

__all__ = ["GENERATOR_VERSION", "SPLIT_SIZES", "TASKS", "TASKS_VERSION", "TASK_NAMES", "TaskSpec", "caption_pairs", "task_split",
           "to_tensor", "vocabulary"]
