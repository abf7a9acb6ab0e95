"""LiNeS: layer-increasing network scaling of a merged task vector (docs/algorithms.md §4; Wang et al., ICLR 2025).

With tau_merged the base merge at lambda = 1 (task arithmetic: sum_t tau_t; TIES: its disjoint
merge), L the model's depth (``KeyInput.num_blocks``, detected from the keys: not hard-coded) and
l in [0, L-1] the residual block of a key::

    scale(key) = alpha + beta * l / (L - 1)     inside block l   (L = 1: alpha)
    scale(key) = alpha                          outside the blocks
    theta      = theta_0 + scale(key) * tau_merged(key)
    alpha      = (||sum_t tau_t||_1 / ||tau_merged||_1) / T      when ``alpha`` is None

Sources (github.com/wang-kee/LiNeS @ 43a7bdd): ``src/eval/eval.py`` ``LiNeS_scaling`` and the
multi-task branch ``alpha = (norm_summed_tvs / norm_mtv) / num_tasks, beta = scaling_coef``, with
the merged vector applied at ``scaling_coef = 1.0``; ``src/eval/aggregation.py`` computes both L1
norms over the whole flattened model. beta has no fixed default there: it is picked on validation
from ``np.linspace(0, 1, 11)[1:]`` = {0.1, ..., 1.0}; we default to 0.5, the middle of that grid.
The official TIES config (``config/method/ties.yaml``) uses k = 20 % and ``agg: mean``; our
``ties_merge`` defaults to ``dis-sum`` like our ``ties`` method (alpha absorbs the difference in
overall size, not in depth profile).

Streaming: for task arithmetic ||tau_merged||_1 = ||sum_t tau_t||_1, so alpha = 1/T needs no pass.
For TIES: passes 0-1 are TIES' threshold passes; pass 2 sums the two L1 norms and TIES' majority
sign. Entries whose elected sum is exactly 0 take that majority sign, unknown until the end of
pass 2, so pass 2 keeps ||tau_merged||_1 for each possible majority sign (+1, -1, 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

from ..base import KeyInput, Merger, stack_sum
from ..registry import register_merger
from .ties import Ties, TiesConfig


@dataclass(frozen=True)
class LinesConfig:
    base: Literal["task_arithmetic", "ties"] = "task_arithmetic"
    alpha: Optional[float] = None     # None: (||sum tau||_1 / ||tau_merged||_1) / T
    beta: float = 0.5
    ties_k: float = 0.2               # base = ties: fraction of entries each task keeps
    ties_merge: Literal["dis-sum", "dis-mean"] = "dis-sum"

    def __post_init__(self):
        if self.base not in ("task_arithmetic", "ties"):
            raise ValueError(f"base={self.base!r} must be 'task_arithmetic' or 'ties'")
        TiesConfig(1.0, self.ties_k, self.ties_merge)  # validates the TIES options


def block_scale(alpha: float, beta: float, block: int | None, num_blocks: int) -> float:
    """alpha + beta * l / (L - 1) inside block l, alpha outside the blocks or when L <= 1."""
    if block is None or num_blocks <= 1:
        return alpha
    return alpha + beta * block / (num_blocks - 1)


@register_merger("lines")
class Lines(Merger):
    Config = LinesConfig

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        self._ties = Ties(TiesConfig(1.0, c.ties_k, c.ties_merge)) if c.base == "ties" else None
        self.passes = 3 if self._ties else 0
        self.alpha: float | None = c.alpha

    # -- statistics (TIES base only) -------------------------------------------------------
    def begin(self, tasks, pass_index):
        if pass_index < 2:
            self._ties.begin(tasks, pass_index)
        else:
            self._num_tasks = len(tasks)
            self._l1_sum = 0.0
            self._l1_merged = {1.0: 0.0, -1.0: 0.0, 0.0: 0.0}
            self._sign_total = 0.0

    def observe(self, inp: KeyInput, pass_index: int) -> None:
        if pass_index < 2:
            self._ties.observe(inp, pass_index)
            return
        self._l1_sum += float(stack_sum(inp.taus).abs().sum(dtype=torch.float64))
        taus = self._ties.trimmed(inp)
        gamma = torch.sign(stack_sum(taus))
        self._sign_total += float(gamma.sum())
        nonzero = torch.zeros_like(gamma, dtype=torch.bool)
        for t in taus:  # no T x numel stack
            nonzero |= t != 0
        ambiguous = bool(((gamma == 0) & nonzero).any())
        for s in ((1.0, -1.0, 0.0) if ambiguous else (1.0,)):
            self._ties._sign_total = s
            l1 = float(self._ties.merge_key(inp, final=True).abs().sum(dtype=torch.float64))
            for k in ((s,) if ambiguous else self._l1_merged):
                self._l1_merged[k] += l1

    def end(self, pass_index: int) -> None:
        if pass_index < 2:
            self._ties.end(pass_index)
            return
        majority = float(torch.sign(torch.tensor(self._sign_total)))
        self._ties._sign_total = self._sign_total
        if self.config.alpha is None:
            merged = self._l1_merged[majority]
            ratio = self._l1_sum / merged if merged > 0 else 1.0
            self.alpha = ratio / self._num_tasks

    # -- merge -----------------------------------------------------------------------------
    def merge_key(self, inp: KeyInput) -> Tensor:
        if self._ties is None:
            merged = stack_sum(inp.taus)
            if self.alpha is None:
                self.alpha = 1.0 / inp.num_tasks
        else:
            self._ties.trimmed(inp)
            merged = self._ties.merge_key(inp, final=True)   # majority sign known from pass 2
        return merged.mul_(block_scale(self.alpha, self.config.beta, inp.block, inp.num_blocks))

    def finalize(self) -> dict:
        return {"alpha": self.alpha} if self.alpha is not None else {}
