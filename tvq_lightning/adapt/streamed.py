"""Block-streamed merge: each block's merged weights exist only while that block runs.

:func:`~.merge_fn.merged_params` builds the merged weights of every key at once; with
``functional_call`` autograd then keeps all of them alive until the backward pass, and the
gradients of all of them accumulate before :class:`~.merge_fn.MergeKey` turns them into
coefficient gradients: two more fp32 copies of the model next to the packed task vectors.

:class:`StreamedEncoder` instead merges inside the forward, one block at a time. The blocks
("units") are the children of the encoder's top-most ``nn.ModuleList`` / ``nn.Sequential``
(ViT: the residual attention blocks; ResNet: the bottlenecks). Each unit's forward is replaced,
for the duration of one call, by an activation-checkpointed function that

1. merges the unit's keys (``MergeKey``: decodes the task vectors one at a time),
2. runs the unit's own forward with those weights (``_reparametrize_module``),

and keeps nothing but the unit's input. In backward the unit is recomputed (its keys merged
again), back-propagated, and each key's weight gradient is consumed right away by ``MergeKey``'s
backward (decoding once more) into ``d lambda``. Keys outside every unit (patch embedding,
positional embedding, final projection) are merged once per call, as ``merged_params`` does.

So at any moment the merge holds one unit's merged weights and their gradients; the price is one
more decode of every task vector per step (forward, recompute, backward) and one more forward of
every unit (as with any activation checkpointing). Gradients are those of ``merged_params`` +
``functional_call``: only the order of floating-point operations differs.

Each unit must be run through its own ``forward`` (``unit(x)``, as ModuleList / Sequential blocks
are): a unit whose weights its parent reads directly would silently see theta_0, so a call in
which some unit with merged keys never ran raises :class:`~tvq_lightning.errors.TvqError`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.stateless import _reparametrize_module

from ..errors import TvqError
from .merge_fn import MergeKey, base_tensors, check_coefficients
from .packed import PackedTaskVectors

_STACKS = (nn.ModuleList, nn.Sequential)


def _inside(name: str, prefix: str) -> bool:
    return prefix == "" or name.startswith(prefix + ".")


def find_units(encoder: nn.Module) -> list[str]:
    """The children of the encoder's top-most ModuleList / Sequential containers, by module name."""
    stacks: list[str] = []
    for name, m in encoder.named_modules():
        if isinstance(m, _STACKS) and not any(_inside(name, s) for s in stacks):
            stacks.append(name)
    return [f"{s}.{c}" if s else c for s in stacks for c, _ in encoder.get_submodule(s).named_children()]


class StreamedEncoder:
    """``StreamedEncoder(encoder, packed)(coeffs, images)``: the encoder's output with merged weights
    theta0 + sum_t lam_t tau_t, built unit by unit inside the forward (see the module docstring).

    ``coeffs``: clamped coefficients, ``(T,)`` or ``(K, T)`` as for :func:`~.merge_fn.merged_params`;
    the encoder's own parameters are theta_0. Neither object is copied.
    """

    def __init__(self, encoder: nn.Module, packed: PackedTaskVectors):
        self.encoder, self.packed = encoder, packed
        base = base_tensors(encoder)
        rows = {k: i for i, k in enumerate(packed.keys) if packed.has_vector(k)}
        missing = [k for k in rows if k not in base]
        if missing:
            raise TvqError(f"the encoder has no parameter or buffer {missing[0]!r} (a key of store {packed.store_path}); "
                           "give the encoder the store was built from (without a prefix)")
        self.units: dict[str, list[tuple[int, str]]] = {}     # unit name -> [(coefficient row, key)]
        for unit in find_units(encoder):
            keys = [(i, k) for k, i in rows.items() if _inside(k, unit)]
            if keys:
                self.units[unit] = keys
        inside = {k for keys in self.units.values() for _, k in keys}
        self.outer = [(i, k) for k, i in rows.items() if k not in inside]

    def __call__(self, coeffs: Tensor, *args, **kwargs) -> Tensor:
        check_coefficients(coeffs, self.packed)
        base = base_tensors(self.encoder)

        def merge(keys: list[tuple[int, str]], prefix: str = "") -> dict[str, Tensor]:
            return {k[len(prefix):]: MergeKey.apply(coeffs[i] if coeffs.dim() == 2 else coeffs, base[k], self.packed, k)
                    for i, k in keys}

        called: set[str] = set()
        with self._patched(merge, called):
            out = functional_call(self.encoder, merge(self.outer), args, kwargs)
        if len(called) != len(self.units):
            unit = next(u for u in self.units if u not in called)
            raise TvqError(f"encoder block {unit!r} holds merged weights but its forward never ran (its parent reads "
                           "its weights directly?); the streamed merge cannot rebuild them: use checkpoint_tasks=False")
        return out

    @contextmanager
    def _patched(self, merge: Callable, called: set[str]) -> Iterator[None]:
        """Each unit's ``forward`` replaced by its checkpointed merge-and-run, restored on exit."""
        saved = {}
        try:
            for unit, keys in self.units.items():
                module = self.encoder.get_submodule(unit)
                saved[unit] = module.__dict__.get("forward")
                module.forward = self._wrap(unit, module, keys, merge, called)
            yield
        finally:
            for unit, own in saved.items():
                module = self.encoder.get_submodule(unit)
                del module.forward
                if own is not None:
                    module.forward = own

    @staticmethod
    def _wrap(unit: str, module: nn.Module, keys, merge: Callable, called: set[str]) -> Callable:
        forward = module.forward        # the module's own (bound) forward

        def run(*args, **kwargs):
            with _reparametrize_module(module, merge(keys, unit + ".")):
                return forward(*args, **kwargs)

        def checkpointed(*args, **kwargs):
            called.add(unit)
            if not torch.is_grad_enabled():
                return run(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

        return checkpointed
