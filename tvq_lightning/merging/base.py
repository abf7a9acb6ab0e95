"""The merger interface: a pure per-key merge plus optional streaming statistics.

The engine (:mod:`.engine`) walks the store's keys; for each key it builds a :class:`KeyInput`
(theta_0's tensor and every task's dequantized task vector, on the merge device) and calls
:meth:`Merger.merge_key`, which returns the merged *task vector* for that key; the engine adds
theta_0 and casts to theta_0's dtype. Methods that need a global statistic (TIES' per-task
magnitude threshold, EMR's rescalers, LiNeS' norms) declare ``passes`` and see every key once per
pass in :meth:`Merger.observe` before merging; they never see more than one key at a time.
Methods with ``per_task = True`` return a :class:`PerTaskDelta` (a shared vector, one boolean mask
per task, one scalar per task) that the engine writes as a compact artifact.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor


class KeyInput:
    """One key's inputs to a merge.

    ``taus`` (one float32 task vector per task, on the merge device) is decoded on first access,
    so a statistics pass that only needs ``levels`` (exact magnitude histograms of quantized task
    vectors) never dequantizes; ``levels`` and ``packed`` (every task's per-tensor codes side by
    side, :class:`~.fused.PackedKey`, for the fused kernels; None where they do not apply) are
    also read on first access. Each may be given as a value or as a function computing it.
    """

    def __init__(self, key: str, pretrained: Tensor, taus: list[Tensor] | Callable[[], list[Tensor]], tasks: list[str],
                 block: int | None = None, num_blocks: int = 0, quantized: bool = False,
                 levels: list[tuple[Tensor, Tensor] | None] | None | Callable[[], Any] = None,
                 packed: Any = None):
        self.key = key
        self.pretrained = pretrained          # float32, on the merge device
        self.tasks = tasks
        self.block = block                    # residual-block index of this key (None outside blocks)
        self.num_blocks = num_blocks          # the model's depth L
        self.quantized = quantized
        self._levels = levels                 # per task: exact (|value|, count) histogram, if known
        self._packed = packed                 # the tasks' packed codes (PackedKey), if the fused path applies
        self._taus = taus

    @property
    def taus(self) -> list[Tensor]:
        if callable(self._taus):
            self._taus = self._taus()
        return self._taus

    @taus.setter
    def taus(self, value: list[Tensor]) -> None:
        self._taus = value

    @property
    def levels(self) -> list[tuple[Tensor, Tensor] | None] | None:
        if callable(self._levels):
            self._levels = self._levels()
        return self._levels

    @levels.setter
    def levels(self, value) -> None:
        self._levels = value

    @property
    def packed(self):
        """The :class:`~.fused.PackedKey` of this key, or None (then use ``taus``)."""
        if callable(self._packed):
            self._packed = self._packed()
        return self._packed

    @packed.setter
    def packed(self, value) -> None:
        self._packed = value

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)


@dataclass
class PerTaskDelta:
    """A per-task merge of one key: task t uses ``scales[t] * masks[t] * shared``."""

    shared: Tensor
    masks: list[Tensor]


@dataclass(frozen=True)
class NoConfig:
    """A method without options."""


class Merger:
    """Base class of every merging method (see the module docstring)."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    per_task: ClassVar[bool] = False
    #: number of statistics passes over the keys before the merge pass
    passes: ClassVar[int] = 0

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()

    def begin(self, tasks: list[str], pass_index: int) -> None:
        """Called before each statistics pass."""

    def observe(self, inp: KeyInput, pass_index: int) -> None:
        """See one key during statistics pass ``pass_index``."""

    def end(self, pass_index: int) -> None:
        """Called after each statistics pass."""

    def merge_key(self, inp: KeyInput) -> Tensor | PerTaskDelta:
        raise NotImplementedError

    def finalize(self) -> dict[str, Any]:
        """After the merge pass: values to record with the output (e.g. per-task rescalers)."""
        return {}

    def describe(self) -> str:
        opts = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config))
        return f"{self.name}({opts})"


def stack_sum(taus: list[Tensor]) -> Tensor:
    """Sum of task vectors without materialising a T x numel stack."""
    out = taus[0].clone()
    for t in taus[1:]:
        out.add_(t)
    return out


def sign(t: Tensor) -> Tensor:
    return torch.sign(t)
