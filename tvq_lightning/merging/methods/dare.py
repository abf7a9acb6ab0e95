"""DARE: drop and rescale, then merge (docs/algorithms.md §4; Yu et al., ICML 2024).

Per key k and task t, with a Bernoulli mask drawn from a generator seeded by (seed, k, t)::

    keep_t ~ Bernoulli(1 - p)  (entry dropped when u < p, u ~ U[0, 1) from ``dare_generator``)
    tau'_t = keep_t * tau_t / (1 - p)            (``rescale=False``: no 1/(1 - p))
    base = task_arithmetic:  theta = theta_0 + lambda * sum_t tau'_t
    base = ties:             theta = theta_0 + TIES(tau'_1..tau'_T) with TIES' lambda, k, merge

The mask of (key, task) depends only on ``seed``, the key's name and the task's *name* (not its
position among the merged tasks, nor the key order, nor the device: the uniforms are drawn on the
CPU), so a merge is reproducible and merging a subset of tasks reuses the same masks.

Defaults from FusionBench (github.com/tanganke/fusion_bench, ``config/method/dare/
task_arithmetic.yaml``): ``sparsity_ratio: 0.5``, ``scaling_factor: 0.3``, ``rescale: true``.
(``dare/ties_merging.yaml`` uses scaling 0.5 with TIES' k = 0.2 and sum: pass ``scaling=0.5``.)
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..base import KeyInput, Merger, stack_sum
from ..registry import register_merger
from .ties import Ties, TiesConfig


def dare_seed(seed: int, key: str, task: str) -> int:
    """A 63-bit generator seed from (seed, key name, task name), stable across runs and platforms."""
    digest = hashlib.sha256(f"dare\x00{int(seed)}\x00{key}\x00{task}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare_keep(shape, p: float, seed: int, key: str, task: str) -> Tensor:
    """The CPU boolean keep-mask of (key, task): u >= p with u ~ U[0, 1) from the seeded generator."""
    g = torch.Generator(device="cpu").manual_seed(dare_seed(seed, key, task))
    return torch.rand(shape, generator=g) >= p


@dataclass(frozen=True)
class DareConfig:
    p: float = 0.5                 # drop probability
    scaling: float = 0.3           # lambda (task arithmetic) or TIES' lambda
    seed: int = 0
    rescale: bool = True           # survivors * 1/(1 - p)
    base: Literal["task_arithmetic", "ties"] = "task_arithmetic"
    ties_k: float = 0.2            # base = ties: fraction of entries each task keeps
    ties_merge: Literal["dis-sum", "dis-mean"] = "dis-sum"

    def __post_init__(self):
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"p={self.p} must be in [0, 1): the probability of dropping an entry")
        if self.base not in ("task_arithmetic", "ties"):
            raise ValueError(f"base={self.base!r} must be 'task_arithmetic' or 'ties'")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an integer")
        TiesConfig(self.scaling, self.ties_k, self.ties_merge)  # validates the TIES options


@register_merger("dare")
class Dare(Merger):
    Config = DareConfig

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        self._ties = Ties(TiesConfig(c.scaling, c.ties_k, c.ties_merge)) if c.base == "ties" else None
        self.passes = self._ties.passes if self._ties else 0

    def drop(self, inp: KeyInput) -> None:
        """Apply the DARE masks to ``inp.taus`` in place (and forget level histograms and packed codes)."""
        c = self.config
        for tau, task in zip(inp.taus, inp.tasks):
            keep = dare_keep(tau.shape, c.p, c.seed, inp.key, task).to(tau.device)
            tau.masked_fill_(~keep, 0.0)
            if c.rescale and c.p > 0:
                tau.div_(1.0 - c.p)
        inp.levels = None
        inp.packed = None

    def begin(self, tasks, pass_index):
        self._ties.begin(tasks, pass_index)

    def observe(self, inp: KeyInput, pass_index: int) -> None:
        self.drop(inp)
        self._ties.observe(inp, pass_index)

    def end(self, pass_index: int) -> None:
        self._ties.end(pass_index)

    def merge_key(self, inp: KeyInput, final: bool = False) -> Tensor | None:
        self.drop(inp)  # seeded: a deferred key, re-read from the store, gets the same masks
        if self._ties is not None:
            return self._ties.merge_key(inp, final)
        return stack_sum(inp.taus).mul_(self.config.scaling)
