"""EMR-Merging: elect, mask, rescale (docs/algorithms.md §4; Huang et al., NeurIPS 2024).

Per key k, with task vectors tau_1..tau_T::

    gamma   = sign(sum_t tau_t), where a sum of exactly 0 counts as -1
    tau_uni = gamma * max{ |tau_t| : tau_t * gamma > 0 }   (0 where no task agrees with gamma)
    M_t     = [tau_t * gamma > 0]
    lambda_t = sum_k mean|tau_tk| / sum_k mean|M_tk * tau_uni,k|

Task t is evaluated with theta_0 + lambda_t * M_t * tau_uni (the task id is needed). The
rescalers are two running sums per task, accumulated key by key during the single merge pass
(no statistics pass), and returned by :meth:`Emr.finalize` as ``{"scales": [...]}``. A task whose
mask is empty everywhere gets lambda_t = 1 (its model is theta_0 whatever the scale).
"""
from __future__ import annotations

import torch

from ..base import KeyInput, Merger, PerTaskDelta, stack_sum
from ..registry import register_merger


@register_merger("emr")
class Emr(Merger):
    per_task = True

    def __init__(self, config=None):
        super().__init__(config)
        self._num: list[float] | None = None   # sum_k mean|tau_tk|
        self._den: list[float] | None = None   # sum_k mean|M_tk * tau_uni,k|

    def merge_key(self, inp: KeyInput) -> PerTaskDelta:
        taus = inp.taus
        if self._num is None:
            self._num = [0.0] * len(taus)
            self._den = [0.0] * len(taus)
        total = stack_sum(taus)
        gamma = torch.where(total > 0, 1.0, -1.0)
        del total
        magnitude = torch.zeros_like(taus[0])
        masks = []
        for t, tau in enumerate(taus):
            m = (tau * gamma) > 0
            masks.append(m)
            torch.maximum(magnitude, torch.where(m, tau.abs(), 0.0), out=magnitude)
            if tau.numel():
                self._num[t] += float(tau.abs().mean())
        if magnitude.numel():
            for t, m in enumerate(masks):
                self._den[t] += float(torch.where(m, magnitude, 0.0).mean())
        return PerTaskDelta(magnitude.mul_(gamma), masks)

    def finalize(self) -> dict:
        if self._num is None:
            return {}
        return {"scales": [n / d if d > 0 else 1.0 for n, d in zip(self._num, self._den)]}
