"""Weight averaging and task arithmetic (docs/algorithms.md §4)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..base import KeyInput, Merger, stack_sum
from ..registry import register_merger


@register_merger("weight_averaging")
class WeightAveraging(Merger):
    """theta = theta_0 + mean_t tau_t (= the mean of the fine-tuned weights)."""

    def merge_key(self, inp: KeyInput) -> Tensor:
        return stack_sum(inp.taus).div_(inp.num_tasks)


@dataclass(frozen=True)
class TaskArithmeticConfig:
    scaling: float = 0.3


@register_merger("task_arithmetic")
class TaskArithmetic(Merger):
    """theta = theta_0 + lambda * sum_t tau_t, lambda = 0.3 by default."""

    Config = TaskArithmeticConfig

    def merge_key(self, inp: KeyInput) -> Tensor:
        return stack_sum(inp.taus).mul_(self.config.scaling)
