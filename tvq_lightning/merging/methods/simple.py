"""Weight averaging and task arithmetic (docs/algorithms.md §4)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..base import KeyInput, Merger, stack_sum
from ..fused import sum_packed
from ..registry import register_merger


def packed_or_stack_sum(inp: KeyInput) -> Tensor:
    """``sum_t tau_t`` from the packed codes when the fused kernels apply, else from the task vectors."""
    return sum_packed(inp.packed) if inp.packed is not None else stack_sum(inp.taus)


@register_merger("weight_averaging")
class WeightAveraging(Merger):
    """theta = theta_0 + mean_t tau_t (= the mean of the fine-tuned weights)."""

    def merge_key(self, inp: KeyInput) -> Tensor:
        return packed_or_stack_sum(inp).div_(inp.num_tasks)


@dataclass(frozen=True)
class TaskArithmeticConfig:
    scaling: float = 0.3


@register_merger("task_arithmetic")
class TaskArithmetic(Merger):
    """theta = theta_0 + lambda * sum_t tau_t, lambda = 0.3 by default."""

    Config = TaskArithmeticConfig

    def merge_key(self, inp: KeyInput) -> Tensor:
        return packed_or_stack_sum(inp).mul_(self.config.scaling)
