"""MagMax: per entry, the task vector of largest magnitude (docs/algorithms.md §4; Marczak et al., ECCV 2024).

Per entry i::

    t*(i)   = argmax_t |tau_t(i)|        (ties -> the lowest task index)
    theta_i = theta_0,i + lambda * tau_{t*(i)}(i)

lambda defaults to 0.5, the official 8-dataset setting (github.com/danielm1405/magmax @ 4f49f18,
``merge_8datasets.py``: ``(merge_max_abs, [0.5])``; FusionBench's ``magmax.yaml`` agrees).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..base import KeyInput, Merger
from ..registry import register_merger


@dataclass(frozen=True)
class MagMaxConfig:
    scaling: float = 0.5


@register_merger("magmax")
class MagMax(Merger):
    Config = MagMaxConfig

    def merge_key(self, inp: KeyInput) -> Tensor:
        best = inp.taus[0].clone()
        best_abs = best.abs()
        for tau in inp.taus[1:]:
            a = tau.abs()
            larger = a > best_abs            # strict: an equal magnitude keeps the earlier task
            best = torch.where(larger, tau, best)
            best_abs = torch.where(larger, a, best_abs)
        return best.mul_(self.config.scaling)
