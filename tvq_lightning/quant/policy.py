"""Which tensors of a state dict are quantized (docs/algorithms.md §1).

Decided by tensor rank and dtype, and — when the model is at hand — by module type, never by
substrings of key names, so the same policy works for open_clip, timm and HF keys.

Policies (``list_policies()``):

- ``"rank"`` (default): every floating tensor of rank >= 2 — Linear / Conv weights, and also the
  raw projection matrices (open_clip ``proj``) and positional / token embeddings. Biases, norms,
  class tokens and scalars (rank <= 1) stay full precision. For a ViT-B/32 image encoder this is
  the paper's list plus ``proj`` and ``positional_embedding`` (0.49 % of its parameters).
- ``"linear"``: the paper's exact list — weights of Linear / Conv / attention in-projection
  layers. From a state dict alone this is "rank >= 2 and the parameter's own name ends in
  ``weight``" (``conv1.weight``, ``attn.in_proj_weight``, ``mlp.c_fc.weight``, but not ``proj``
  or ``positional_embedding``); :func:`module_linear_keys` gives it from an ``nn.Module``.
- ``"none"``: nothing is quantized (the ``fp32`` scheme).

Integer tensors are never quantized nor merged.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..errors import QuantConfigError

_POLICIES: dict[str, Callable[[str, tuple[int, ...], torch.dtype], bool]] = {}


def register_policy(name: str):
    def deco(fn):
        _POLICIES[name] = fn
        return fn
    return deco


def list_policies() -> list[str]:
    return sorted(_POLICIES)


@register_policy("rank")
def _rank(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and len(shape) >= 2


@register_policy("linear")
def _linear(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    return _rank(key, shape, dtype) and key.rsplit(".", 1)[-1].endswith("weight")


@register_policy("none")
def _none(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    return False


def is_quantized(key: str, shape: Iterable[int], dtype: torch.dtype, policy: str = "rank") -> bool:
    """Whether ``key`` (a tensor of ``shape`` and ``dtype``) is quantized under ``policy``."""
    try:
        fn = _POLICIES[policy]
    except KeyError:
        raise QuantConfigError(f"unknown quantization policy {policy!r}: choose one of {', '.join(list_policies())}") from None
    return fn(key, tuple(int(d) for d in shape), dtype)


_LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def module_linear_keys(model: nn.Module, prefix: str = "") -> set[str]:
    """State-dict keys of ``model`` that are weights of Linear / Conv / attention projections."""
    keys: set[str] = set()
    for name, module in model.named_modules():
        base = f"{prefix}{name}." if name else prefix
        if isinstance(module, _LINEAR_TYPES) and getattr(module, "weight", None) is not None:
            keys.add(base + "weight")
        elif isinstance(module, nn.MultiheadAttention):
            for pname in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if getattr(module, pname, None) is not None:
                    keys.add(base + pname)
    return keys
