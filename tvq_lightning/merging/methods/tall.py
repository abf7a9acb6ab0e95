"""TALL masks (per task) and Consensus merging (docs/algorithms.md §4; Wang et al., ICML 2024).

Per key, with tau_MTL = sum_t tau_t (the task-arithmetic vector at lambda = 1)::

    m_t = |tau_t| > lambda_t * |tau_MTL - tau_t|              (TALL mask of task t)
    TALL:      task t's model  = theta_0 + s * (m_t * tau_MTL)          (s = ``scaling``)
    Consensus: one model       = theta_0 + lambda * ([sum_t m_t >= k] * tau_MTL)

Defaults and where they come from (github.com/nik-dim/tall_masks @ d10af8b):
- tau_MTL is the unscaled sum (``src/eval/aggregation.py``: ``merged_tv = tv_flat_checks.sum(0)``
  for method ``tall_mask``), and TALL-masked models are applied with ``scaling_coef = 1.0``
  (``src/eval/eval.py``: ``scaling_coef_range = [1.0]`` for ``tall_mask``): TALL ``scaling = 1``.
- lambda_t: the official code has no single default, it picks one per task from
  {0.2, 0.3, 0.4, 0.5, 0.6} on validation data (``src/utils/tallmask_utils.py``); without data we
  take the middle of that grid, 0.4 (FusionBench's ``tall_mask/task_arithmetic.yaml`` uses 0.6).
- Consensus k = 2 (``config/method/consensus.yaml``: ``prun_thre_k: 2``); its lambda is chosen on
  validation from {0.1, ..., 1.0} there; we default to 0.3, task arithmetic's default.
The masks are always computed from the unscaled tau_MTL; ``scaling`` only scales the result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

from ...errors import TvqError
from ..base import KeyInput, Merger, PerTaskDelta, stack_sum
from ..registry import register_merger

Lambdas = Union[float, tuple]


def _check_lambdas(cfg) -> None:
    lam = cfg.lambdas
    if isinstance(lam, (list, tuple)):
        lam = tuple(float(x) for x in lam)
        if not lam:
            raise ValueError("lambdas=() is empty: give one float, or one per task")
        object.__setattr__(cfg, "lambdas", lam)
        values = lam
    elif isinstance(lam, (int, float)) and not isinstance(lam, bool):
        object.__setattr__(cfg, "lambdas", float(lam))
        values = (float(lam),)
    else:
        raise ValueError(f"lambdas={cfg.lambdas!r} must be a float or a list of floats (one per task)")
    if any(not v >= 0.0 for v in values):
        raise ValueError(f"lambdas={cfg.lambdas!r} must be >= 0")


def task_lambdas(lambdas: Lambdas, tasks: list[str]) -> list[float]:
    """One lambda per task (a single float applies to every task)."""
    if isinstance(lambdas, tuple):
        if len(lambdas) != len(tasks):
            raise TvqError(f"lambdas has {len(lambdas)} values but {len(tasks)} tasks are merged "
                           f"({', '.join(tasks)}); give one float or one value per task")
        return list(lambdas)
    return [float(lambdas)] * len(tasks)


def tall_masks(taus: list[Tensor], lambdas: list[float]) -> tuple[Tensor, list[Tensor]]:
    """``(tau_MTL, [m_t])`` for one key: m_t = |tau_t| > lambda_t |tau_MTL - tau_t|."""
    mtl = stack_sum(taus)
    masks = [tau.abs() > (mtl - tau).abs_().mul_(lam) for tau, lam in zip(taus, lambdas)]
    return mtl, masks


@dataclass(frozen=True)
class TallConfig:
    lambdas: Lambdas = 0.4        # mask threshold, one float or one per task
    scaling: float = 1.0          # s in theta_0 + s * m_t * tau_MTL (official: 1.0)

    def __post_init__(self):
        _check_lambdas(self)


@register_merger("tall")
class Tall(Merger):
    """TALL masks: task t uses theta_0 + scaling * m_t * sum_s tau_s."""

    Config = TallConfig
    per_task = True

    def __init__(self, config=None):
        super().__init__(config)
        self._num_tasks = 0

    def merge_key(self, inp: KeyInput) -> PerTaskDelta:
        self._num_tasks = inp.num_tasks
        mtl, masks = tall_masks(inp.taus, task_lambdas(self.config.lambdas, inp.tasks))
        return PerTaskDelta(mtl, masks)

    def finalize(self) -> dict:
        return {"scales": [float(self.config.scaling)] * self._num_tasks} if self._num_tasks else {}


@dataclass(frozen=True)
class ConsensusConfig:
    k: int = 2                    # keep entries that at least k tasks' TALL masks select
    lambdas: Lambdas = 0.4        # TALL mask threshold, one float or one per task
    scaling: float = 0.3          # lambda in theta_0 + lambda * mask * tau_MTL

    def __post_init__(self):
        if isinstance(self.k, float) and self.k.is_integer():
            object.__setattr__(self, "k", int(self.k))
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"k={self.k!r} must be an integer >= 0: the least number of tasks whose mask keeps an entry")
        _check_lambdas(self)


@register_merger("consensus")
class Consensus(Merger):
    """theta = theta_0 + lambda * ([sum_t m_t >= k] * sum_t tau_t)."""

    Config = ConsensusConfig

    def merge_key(self, inp: KeyInput) -> Tensor:
        mtl, masks = tall_masks(inp.taus, task_lambdas(self.config.lambdas, inp.tasks))
        count = torch.zeros(mtl.shape, dtype=torch.int32, device=mtl.device)
        for m in masks:
            count += m
        return mtl.masked_fill_(count < self.config.k, 0.0).mul_(self.config.scaling)
