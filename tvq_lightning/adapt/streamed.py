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

Slices (``chunk=m``): for an encoder that treats samples independently (frozen, eval mode), each
unit runs on at most ``m`` samples at a time, in forward and in the backward recompute. The unit
is merged once for all slices; in backward its merged weights are leaves whose gradients add up
over the slices; the weights are then freed and each gradient becomes ``d lambda`` as in
``MergeKey``'s backward (same decodes as above). The largest set of activations alive is then one
slice's, not the whole batch's, for one unit-sized buffer of weight gradients. The batch dimension of a unit's input is the one whose size is
the batch size of the encoder's first argument (batch-first images); when two dimensions have
that size, a ``batch_first`` attribute on the unit, an ancestor or a descendant (open_clip's
``transformer.batch_first``, ``nn.MultiheadAttention``'s) decides, and without one the unit runs
whole. Units whose other tensor arguments need gradients or carry a batch dimension (a padding
mask), or whose theta_0 needs a gradient, also run whole.

Each unit must be run through its own ``forward`` (``unit(x)``, as ModuleList / Sequential blocks
are): a unit whose weights its parent reads directly would silently see theta_0, so a call in
which some unit with merged keys never ran raises :class:`~tvq_lightning.errors.TvqError`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.stateless import _reparametrize_module

from ..errors import TvqError
from .merge_fn import MergeKey, base_tensors, check_coefficients, coefficient_grad
from .packed import PackedTaskVectors

_STACKS = (nn.ModuleList, nn.Sequential)
Keys = list[tuple[int, str]]    # [(coefficient row, key)]


def _inside(name: str, prefix: str) -> bool:
    return prefix == "" or name.startswith(prefix + ".")


def find_units(encoder: nn.Module) -> list[str]:
    """The children of the encoder's top-most ModuleList / Sequential containers, by module name."""
    stacks: list[str] = []
    for name, m in encoder.named_modules():
        if isinstance(m, _STACKS) and not any(_inside(name, s) for s in stacks):
            stacks.append(name)
    return [f"{s}.{c}" if s else c for s in stacks for c, _ in encoder.get_submodule(s).named_children()]


def _batch_first(encoder: nn.Module, unit: str) -> bool | None:
    """A ``batch_first`` flag on the unit, else its nearest ancestor, else a descendant (None: none)."""
    parts = unit.split(".")
    for i in range(len(parts), -1, -1):
        flag = getattr(encoder.get_submodule(".".join(parts[:i])), "batch_first", None)
        if isinstance(flag, bool):
            return flag
    for m in encoder.get_submodule(unit).modules():
        if isinstance(getattr(m, "batch_first", None), bool):
            return m.batch_first
    return None


def batch_dim(x: Tensor, n: int, batch_first: bool | None) -> int | None:
    """The dimension of ``x`` holding the ``n`` samples: the only one of size ``n``, else the one
    ``batch_first`` names (0 or 1) if it has that size; None when it cannot be told."""
    dims = [d for d, size in enumerate(x.shape) if size == n]
    if len(dims) > 1 and batch_first is not None:
        dims = [d for d in dims if d == (0 if batch_first else 1)]
    return dims[0] if len(dims) == 1 else None


def _merge(packed: PackedTaskVectors, base: dict[str, Tensor], keys: Keys, coeffs: Tensor,
           prefix: str = "") -> dict[str, Tensor]:
    """``{name without prefix: MergeKey(...)}`` for ``keys``; row i of layer-wise coefficients."""
    return {k[len(prefix):]: MergeKey.apply(coeffs[i] if coeffs.dim() == 2 else coeffs, base[k], packed, k)
            for i, k in keys}


@dataclass
class _Slices:
    """One unit call run ``chunk`` samples at a time along dimension ``dim`` of its input."""

    module: nn.Module
    forward: Callable                                   # the module's own forward
    packed: PackedTaskVectors
    base: dict[str, Tensor]
    keys: Keys
    prefix: str
    rest: tuple                                         # the other positional arguments, whole
    kwargs: dict
    dim: int
    chunk: int

    def ranges(self, n: int) -> list[tuple[int, int]]:
        return [(a, min(a + self.chunk, n) - a) for a in range(0, n, self.chunk)]

    def merge(self, coeffs: Tensor) -> dict[str, Tensor]:
        return _merge(self.packed, self.base, self.keys, coeffs, self.prefix)

    def output(self, weights: dict[str, Tensor], x: Tensor) -> Tensor:
        """The unit's output on ``x``, computed slice by slice into one tensor (no autograd)."""
        out = None
        with _reparametrize_module(self.module, weights):
            for a, m in self.ranges(x.shape[self.dim]):
                y = self.forward(x.narrow(self.dim, a, m), *self.rest, **self.kwargs)
                if not isinstance(y, Tensor) or y.dim() <= self.dim or y.shape[self.dim] != m:
                    raise TvqError(f"a unit ({type(self.module).__name__}) did not return one tensor with its input's "
                                   f"samples along dimension {self.dim}; the streamed merge cannot run it in slices: "
                                   "use chunk=None")
                if out is None:
                    out = y.new_empty(y.shape[:self.dim] + (x.shape[self.dim],) + y.shape[self.dim + 1:])
                out.narrow(self.dim, a, m).copy_(y)
        return out


class _SlicedUnit(torch.autograd.Function):
    """``_SlicedUnit.apply(slices, coeffs, x)``: the unit's output. Backward merges the unit again,
    recomputes and back-propagates it one slice at a time into weight gradients summed over the
    slices, frees the merged weights, then turns each weight gradient into coefficient gradients
    (:func:`~.merge_fn.coefficient_grad`, as ``MergeKey``'s backward). Saves only ``coeffs`` and ``x``."""

    @staticmethod
    def forward(ctx, s: _Slices, coeffs: Tensor, x: Tensor) -> Tensor:
        ctx.s = s
        ctx.save_for_backward(coeffs, x)
        dev = x.device.type   # the recomputation in backward runs under the forward's autocast, as checkpointing does
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        return s.output(s.merge(coeffs), x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        s: _Slices = ctx.s
        coeffs, x = ctx.saved_tensors
        weights = {k: w.requires_grad_() for k, w in s.merge(coeffs.detach()).items()}
        gx = torch.empty_like(x) if ctx.needs_input_grad[2] else None
        dev, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled), \
                _reparametrize_module(s.module, weights):
            for a, m in s.ranges(x.shape[s.dim]):
                xs = x.narrow(s.dim, a, m).detach().requires_grad_(gx is not None)
                y = s.forward(xs, *s.rest, **s.kwargs)
                torch.autograd.backward(y, grad.narrow(s.dim, a, m))
                if gx is not None:
                    gx.narrow(s.dim, a, m).copy_(xs.grad)
                del xs, y
        grads = {s.prefix + k: w.grad for k, w in weights.items()}
        del weights                                     # only the weight gradients are left
        dc = None
        if ctx.needs_input_grad[1]:
            dc = torch.zeros(coeffs.shape, dtype=torch.float32, device=coeffs.device)
            for i, k in s.keys:
                g = grads.pop(k)
                if g is not None:
                    (dc[i] if coeffs.dim() == 2 else dc).add_(coefficient_grad(s.packed, k, g))
                del g
            dc = dc.to(coeffs.dtype)
        return None, dc, gx


class StreamedEncoder:
    """``StreamedEncoder(encoder, packed)(coeffs, images)``: the encoder's output with merged weights
    theta0 + sum_t lam_t tau_t, built unit by unit inside the forward (see the module docstring).

    ``coeffs``: clamped coefficients, ``(T,)`` or ``(K, T)`` as for :func:`~.merge_fn.merged_params`;
    the encoder's own parameters are theta_0. Neither object is copied. ``chunk``: run each unit on
    at most this many samples at a time (the encoder must treat samples independently); None: the
    whole batch at once.
    """

    def __init__(self, encoder: nn.Module, packed: PackedTaskVectors, chunk: int | None = None):
        if chunk is not None and chunk < 1:
            raise TvqError(f"chunk={chunk}: give a positive number of samples per slice, or None")
        self.encoder, self.packed, self.chunk = encoder, packed, chunk
        base = base_tensors(encoder)
        rows = {k: i for i, k in enumerate(packed.keys) if packed.has_vector(k)}
        missing = [k for k in rows if k not in base]
        if missing:
            raise TvqError(f"the encoder has no parameter or buffer {missing[0]!r} (a key of store {packed.store_path}); "
                           "give the encoder the store was built from (without a prefix)")
        self.units: dict[str, Keys] = {}     # unit name -> [(coefficient row, key)]
        for unit in find_units(encoder):
            keys = [(i, k) for k, i in rows.items() if _inside(k, unit)]
            if keys:
                self.units[unit] = keys
        inside = {k for keys in self.units.values() for _, k in keys}
        self.outer = [(i, k) for k, i in rows.items() if k not in inside]
        self._batch_first = {unit: _batch_first(encoder, unit) for unit in self.units} if chunk else {}

    def __call__(self, coeffs: Tensor, *args, **kwargs) -> Tensor:
        check_coefficients(coeffs, self.packed)
        base = base_tensors(self.encoder)

        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        n = None if first is None or first.dim() == 0 else first.shape[0]
        called: set[str] = set()
        with self._patched(coeffs, base, n, called):
            out = functional_call(self.encoder, _merge(self.packed, base, self.outer, coeffs), args, kwargs)
        if len(called) != len(self.units):
            unit = next(u for u in self.units if u not in called)
            raise TvqError(f"encoder block {unit!r} holds merged weights but its forward never ran (its parent reads "
                           "its weights directly?); the streamed merge cannot rebuild them: use checkpoint_tasks=False")
        return out

    @contextmanager
    def _patched(self, coeffs: Tensor, base: dict[str, Tensor], n: int | None, called: set[str]) -> Iterator[None]:
        """Each unit's ``forward`` replaced by its checkpointed merge-and-run, restored on exit."""
        saved = {}
        try:
            for unit, keys in self.units.items():
                module = self.encoder.get_submodule(unit)
                saved[unit] = module.__dict__.get("forward")
                module.forward = self._wrap(unit, module, keys, coeffs, base, n, called)
            yield
        finally:
            for unit, own in saved.items():
                module = self.encoder.get_submodule(unit)
                del module.forward
                if own is not None:
                    module.forward = own

    def _wrap(self, unit: str, module: nn.Module, keys: Keys, coeffs: Tensor, base: dict[str, Tensor],
              n: int | None, called: set[str]) -> Callable:
        forward = module.forward        # the module's own (bound) forward
        prefix = unit + "."

        def run(*args, **kwargs):
            with _reparametrize_module(module, _merge(self.packed, base, keys, coeffs, prefix)):
                return forward(*args, **kwargs)

        def slices(args: tuple, kwargs: dict) -> _Slices | None:
            """How to run this call in slices, or None (the unit runs whole; see the module docstring)."""
            if self.chunk is None or n is None or not args or not isinstance(args[0], Tensor):
                return None
            if any(base[k].requires_grad for _, k in keys):
                return None
            others = [a for a in (*args[1:], *kwargs.values()) if isinstance(a, Tensor)]
            if any(a.requires_grad or n in a.shape for a in others):
                return None
            dim = batch_dim(args[0], n, self._batch_first[unit])
            if dim is None:
                return None
            return _Slices(module, forward, self.packed, base, keys, prefix, args[1:], kwargs, dim, self.chunk)

        def call(*args, **kwargs):
            called.add(unit)
            s = slices(args, kwargs)
            if s is not None:
                if not torch.is_grad_enabled():
                    return s.output(s.merge(coeffs), args[0])
                return _SlicedUnit.apply(s, coeffs, args[0])
            if not torch.is_grad_enabled():
                return run(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

        return call


@contextmanager
def saved_as_parts(whole: Tensor, parts: Sequence[Tensor]) -> Iterator[None]:
    """Inside, an op that saves ``whole`` (``torch.cat(parts)``) for backward keeps the ``parts``
    instead, and backward concatenates them again when it needs it: between forward and backward
    the batch is held once (by the caller), not twice. The parts must not change in between."""
    versions = [p._version for p in parts]
    ident = (whole.data_ptr(), whole.shape, whole.stride(), whole.dtype, whole.device)   # no reference to whole

    def pack(t: Tensor):
        return _Parts if (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device) == ident else t

    def unpack(saved):
        if saved is not _Parts:
            return saved
        if [p._version for p in parts] != versions:
            raise TvqError("a batch tensor was modified in place between forward and backward")
        return torch.cat(list(parts))

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class _Parts:
    """Marker of a saved ``whole`` in :func:`saved_as_parts`."""
