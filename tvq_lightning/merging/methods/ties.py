"""TIES-Merging: trim, elect sign, disjoint merge (docs/algorithms.md §4).

The per-task trim threshold is global over the whole model: v_t is the (d - floor(k d))-th
smallest |tau_t| over all d entries, and entries with |tau_t| >= v_t are kept. It is found
exactly in two streaming passes (:class:`~..histogram.StreamingQuantile`); for TVQ stores the
passes read exact level histograms instead of dense values. Entries whose elected sum is exactly
zero take the whole model's majority sign, which is only known after the merge pass: keys with
such entries are deferred (only their names are kept) and re-read and merged last.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..base import KeyInput, Merger
from ..fused import ties_packed
from ..histogram import StreamingQuantile
from ..registry import register_merger


@dataclass(frozen=True)
class TiesConfig:
    scaling: float = 0.3
    k: float = 0.2                       # fraction of each task's entries kept (top magnitudes)
    merge: Literal["dis-sum", "dis-mean"] = "dis-sum"

    def __post_init__(self):
        if not 0.0 < self.k <= 1.0:
            raise ValueError(f"k={self.k} must be in (0, 1]: the fraction of entries each task keeps")
        if self.merge not in ("dis-sum", "dis-mean"):
            raise ValueError(f"merge={self.merge!r} must be 'dis-sum' or 'dis-mean'")


def ties_rank(d: int, k: float) -> int:
    """1-based rank from the top of the threshold: the (d - floor(k d))-th smallest."""
    return d - (d - math.floor(k * d)) + 1


@register_merger("ties")
class Ties(Merger):
    Config = TiesConfig
    passes = 2

    def __init__(self, config=None):
        super().__init__(config)
        self.thresholds: list[float] = []
        self._selectors: list[StreamingQuantile] = []
        self._sign_total = 0.0

    def begin(self, tasks, pass_index):
        if pass_index == 0:
            self._selectors = [StreamingQuantile(0) for _ in tasks]
            self._sign_total = 0.0
            self._histograms: list[list[tuple[Tensor, Tensor]]] = [[] for _ in tasks]
            self._from_histograms: set[str] = set()

    def observe(self, inp: KeyInput, pass_index: int) -> None:
        if pass_index == 1 and inp.key in self._from_histograms:
            return                        # its (tiny) level histograms were kept from pass 0
        levels = inp.levels if pass_index == 0 else None
        if levels is not None and all(lv is not None for lv in levels):
            self._from_histograms.add(inp.key)
        for t, sel in enumerate(self._selectors):
            lv = levels[t] if levels else None
            if lv is not None:
                sel.add(*lv)
                if inp.key in self._from_histograms:
                    self._histograms[t].append(lv)
            else:
                sel.add(inp.taus[t])

    def end(self, pass_index: int) -> None:
        if pass_index == 0:
            for sel, hists in zip(self._selectors, self._histograms):
                if self.config.k >= 1.0:
                    sel.rank = sel.total  # keep everything
                else:
                    sel.rank = ties_rank(sel.total, self.config.k)
                sel.next_pass()
                for lv in hists:
                    sel.add(*lv)
            self._histograms = []
        else:
            self.thresholds = [sel.value() for sel in self._selectors]

    def trimmed(self, inp: KeyInput) -> list[Tensor]:
        return [tau.masked_fill_(tau.abs() < v, 0.0) for tau, v in zip(inp.taus, self.thresholds)]

    def merge_key(self, inp: KeyInput, final: bool = False) -> Tensor | None:
        """Merge one key; ``None`` defers it (an exactly-zero elected sum), ``final`` resolves it."""
        if inp.packed is not None:  # straight from the codes, bit-identical to the lines below
            fill = float(torch.sign(torch.tensor(self._sign_total)))
            out, gsum, defer = ties_packed(inp.packed, self.thresholds, final, fill, self.config.merge == "dis-mean")
            if not final:
                self._sign_total += gsum
                if defer:
                    return None
            return out.mul_(self.config.scaling)
        self.trimmed(inp)
        taus = inp.taus
        total = taus[0].clone()
        for t in taus[1:]:
            total.add_(t)
        gamma = torch.sign(total)
        if not final:
            self._sign_total += float(gamma.sum(dtype=torch.float64))
            nonzero = torch.zeros_like(gamma, dtype=torch.bool)
            for t in taus:  # no T x numel stack: one mask, accumulated
                nonzero |= t != 0
            if bool(((gamma == 0) & nonzero).any()):
                return None
        else:
            gamma = torch.where(gamma == 0, torch.sign(torch.tensor(self._sign_total, dtype=gamma.dtype)), gamma)
        out = torch.zeros_like(total)
        count = torch.zeros_like(total) if self.config.merge == "dis-mean" else None
        for t in taus:
            keep = (torch.sign(t) == gamma) & (t != 0)
            out.add_(torch.where(keep, t, torch.zeros_like(t)))
            if count is not None:
                count.add_(keep.float())
        if count is not None:
            out.div_(count.clamp_(min=1.0))
        return out.mul_(self.config.scaling)
