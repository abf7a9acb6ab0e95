"""Model Breadcrumbs: drop each task vector's outliers and negligible entries, then add (docs/algorithms.md §4).

Per tensor (key) and per task, with n = numel and the entries ranked by a *stable* ascending sort
of |tau_t| (equal magnitudes rank by flat index, so the result is deterministic)::

    n_top = floor(beta * n),  n_bot = floor(gamma * n)
    keep entries of rank r with n_bot <= r < n - n_top       (drop the n_bot smallest, n_top largest)
    theta = theta_0 + lambda * sum_t keep_t * tau_t

Defaults (Davari & Belilovsky 2023; github.com/rezazzr/breadcrumbs @ f89fc66): the official
hyper-parameter search for ``paper_implementation`` (``find_best_hyperparam.py``) starts from
alpha = 0.2, keep = 0.15 ("beta" there: the fraction kept), top-removed = 0.006 ("gamma" there).
In this module's terms: ``beta`` = 0.006 (largest fraction dropped), ``gamma`` = 0.85 (smallest
fraction dropped, i.e. 15 % kept), ``scaling`` = 0.2. Note the official code masks along the last
dimension (per row); docs/algorithms.md says per tensor, which is what this module does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..base import KeyInput, Merger
from ..registry import register_merger


@dataclass(frozen=True)
class BreadcrumbsConfig:
    beta: float = 0.006     # fraction of largest-magnitude entries dropped per tensor and task
    gamma: float = 0.85     # fraction of smallest-magnitude entries dropped per tensor and task
    scaling: float = 0.2

    def __post_init__(self):
        for name in ("beta", "gamma"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}={v} must be in [0, 1]")
        if self.beta + self.gamma > 1.0:
            raise ValueError(f"beta + gamma = {self.beta + self.gamma} must be <= 1 (they drop disjoint fractions)")


def breadcrumbs_mask(tau: Tensor, beta: float, gamma: float) -> Tensor:
    """Boolean mask of the entries of ``tau`` that survive (see the module docstring)."""
    flat = tau.reshape(-1)
    n = flat.numel()
    n_top, n_bot = math.floor(beta * n), math.floor(gamma * n)
    keep = torch.zeros(n, dtype=torch.bool, device=tau.device)
    if n - n_top > n_bot:
        order = torch.sort(flat.abs(), stable=True).indices
        keep[order[n_bot:n - n_top]] = True
    return keep.reshape(tau.shape)


@register_merger("breadcrumbs")
class Breadcrumbs(Merger):
    Config = BreadcrumbsConfig

    def merge_key(self, inp: KeyInput) -> Tensor:
        c = self.config
        out = torch.zeros_like(inp.taus[0])
        for tau in inp.taus:
            out.add_(tau.masked_fill_(~breadcrumbs_mask(tau, c.beta, c.gamma), 0.0))
        return out.mul_(c.scaling)
