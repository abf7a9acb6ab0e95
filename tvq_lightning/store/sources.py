"""Opening and validating the weights a store is built from (pre-trained and fine-tuned)."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import IncompatibleWeights, TvqError
from .checkpoints import LazyStateDict, open_checkpoint

WeightsLike = str | Path | Mapping[str, Tensor]
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass
class Source:
    """A named state dict and where it came from (for messages)."""

    name: str
    label: str
    sd: Mapping[str, Tensor]

    def release(self) -> None:
        if isinstance(self.sd, LazyStateDict):
            self.sd.release()

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        if isinstance(self.sd, LazyStateDict):
            return self.sd.meta(key)
        t = self.sd[key]
        return tuple(t.shape), t.dtype


def open_source(name: str, weights: WeightsLike, *, prefix: str | None = None, allow_pickle: bool = False,
                trust_pickle_code: bool = False) -> Source:
    if isinstance(weights, Mapping):
        label = f"<{name} state dict>"
        if not isinstance(weights, LazyStateDict):
            for k, v in weights.items():
                if not isinstance(k, str) or not isinstance(v, Tensor):
                    raise IncompatibleWeights(f"{label}: key {k!r} holds a {type(v).__name__}, not a tensor (keys must be "
                                              f"strings, values tensors); pass model.state_dict() or a checkpoint path")
        return Source(name, label, weights)
    if not isinstance(weights, (str, os.PathLike)):
        raise IncompatibleWeights(f"{name} weights: a {type(weights).__name__} is neither a checkpoint path nor a "
                                  f"state dict; pass a path or model.state_dict()")
    return Source(name, str(weights), open_checkpoint(weights, prefix=prefix, allow_pickle=allow_pickle,
                                                      trust_pickle_code=trust_pickle_code))


def check_task_name(name: str) -> str:
    if not _TASK_NAME.match(name):
        raise TvqError(f"task name {name!r} is not usable as a file name: use letters, digits and _ . + - (e.g. {re.sub(r'[^A-Za-z0-9_.+-]', '_', name) or 'task1'!r})")
    return name


def floating_keys(src: Source) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of the floating tensors; integer buffers are never task vectors."""
    out = {}
    for k in src.sd.keys():
        shape, dtype = src.meta(k)
        if dtype.is_floating_point:
            out[k] = (shape, dtype)
    return out


def check_compatible(pre: dict[str, tuple[tuple[int, ...], torch.dtype]], ft: Source, pre_src: Source | None = None) -> None:
    """Fine-tuned keys and shapes must equal the pre-trained ones; a key floating in one and
    integer in the other is named with both dtypes (``pre_src``: theta_0, for that message)."""
    for k in ft.sd.keys():
        ft_dtype = ft.meta(k)[1]
        pre_dtype = pre[k][1] if k in pre else (pre_src.meta(k)[1] if pre_src is not None and k in pre_src.sd else None)
        if pre_dtype is not None and pre_dtype.is_floating_point != ft_dtype.is_floating_point:
            raise IncompatibleWeights(f"{ft.label}: key {k!r} has dtype {str(ft_dtype).removeprefix('torch.')}, the "
                                      f"pre-trained one {str(pre_dtype).removeprefix('torch.')}; fine-tuned weights must "
                                      f"come from the same model")
    ft_keys = floating_keys(ft)
    missing = [k for k in pre if k not in ft_keys]
    extra = [k for k in ft_keys if k not in pre]
    hint = "were both saved from the same model? select the sub-module with --prefix (e.g. model.encoder.)"
    if missing:
        raise IncompatibleWeights(f"{ft.label}: key {missing[0]!r} of the pre-trained weights is missing ({len(missing)} missing in all); {hint}")
    if extra:
        raise IncompatibleWeights(f"{ft.label}: key {extra[0]!r} is not in the pre-trained weights ({len(extra)} extra in all); {hint}")
    for k, (shape, _) in pre.items():
        if tuple(ft_keys[k][0]) != tuple(shape):
            raise IncompatibleWeights(f"{ft.label}: key {k!r} has shape {tuple(ft_keys[k][0])}, the pre-trained one {tuple(shape)}; fine-tuned weights must come from the same architecture")
