"""Inert stand-ins for the objects of a pickled checkpoint, and reading them.

:mod:`.safe_pickle` turns every class or function a pickle names from an allowed namespace into a
:class:`StandIn` subclass. A stand-in never runs the original code: it records constructor
arguments and pickled state. :func:`module_state_dict` rebuilds what ``nn.Module.state_dict()``
would return from a stand-in module's ``_parameters`` / ``_buffers`` / ``_modules``;
:func:`stand_in_class` and :func:`describe` say what a stand-in was.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tvq_lightning.errors import CheckpointError

__all__ = ["StandIn", "describe", "is_module", "is_stand_in_type", "module_state_dict", "stand_in_class"]

_MAX_DEPTH = 64              # module nesting followed by module_state_dict
_MAX_VISITS = 1_000_000      # modules visited (a shared sub-module is visited under each of its names)


class StandIn:
    """An inert stand-in for an object (or, as a class, a class or function) of a pickled checkpoint.

    It never runs the original code. Constructor arguments are kept in ``_tvq_args`` /
    ``_tvq_kwargs``, the pickled state (the original ``__dict__``) is readable as attributes
    (``head.normalize``, ``module._parameters``; a module's parameters, buffers and sub-modules by
    name, as on ``nn.Module``), dict / list items in ``_tvq_items`` / ``_tvq_list``.
    """

    _tvq_origin = "?"  #: the original ``module.qualname``

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        self = object.__new__(cls)
        self.__dict__.update(_tvq_args=args, _tvq_kwargs=kwargs, _tvq_state={}, _tvq_items={}, _tvq_list=[])
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        state = self.__dict__.get("_tvq_state", {})
        if not name.startswith("__"):
            if name in state:
                return state[name]
            for group in ("_parameters", "_buffers", "_modules"):  # as nn.Module finds them
                entries = state.get(group)
                if isinstance(entries, Mapping) and name in entries:
                    return entries[name]
        raise AttributeError(f"stand-in for {type(self)._tvq_origin} has no attribute {name!r}")

    def __setstate__(self, state: Any) -> None:
        if (isinstance(state, tuple) and len(state) == 2
                and all(s is None or isinstance(s, dict) for s in state)):
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__["_tvq_state"].update((k, v) for k, v in state.items() if isinstance(k, str))
        else:
            self.__dict__["_tvq_raw_state"] = state

    def __repr__(self) -> str:
        return f"<stand-in {type(self)._tvq_origin}>"


def is_stand_in_type(obj: Any) -> bool:
    """Whether ``obj`` is a stand-in class (what a pickled class or function became)."""
    return isinstance(obj, type) and issubclass(obj, StandIn)


def stand_in_class(obj: Any) -> str | None:
    """The original class path of a stand-in (or stand-in class), e.g. ``"src.modeling.ClassificationHead"``;
    None for anything else."""
    if is_stand_in_type(obj):
        return obj._tvq_origin
    return type(obj)._tvq_origin if isinstance(obj, StandIn) else None


def is_module(obj: Any) -> bool:
    """Whether ``obj`` is a stand-in for an ``nn.Module`` (it has ``_modules`` and ``_parameters`` dicts)."""
    state = obj.__dict__.get("_tvq_state", {}) if isinstance(obj, StandIn) else {}
    return isinstance(state.get("_modules"), Mapping) and isinstance(state.get("_parameters"), Mapping)


def module_state_dict(obj: StandIn) -> dict[str, torch.Tensor]:
    """What ``module.state_dict()`` gives for the stand-in module ``obj`` (tensors detached).

    Parameters, then persistent buffers (``None`` skipped), then each sub-module's under ``name.``
    (a shared sub-module under each of its names, as ``nn.Module`` does); raises
    :class:`CheckpointError` for a cycle, nesting deeper than 64 or more than a million modules visited.
    """
    if not is_module(obj):
        raise CheckpointError(f"{stand_in_class(obj) or type(obj).__name__} is not a pickled module (it has no "
                              f"_parameters / _modules); pass the module, or read its attributes")
    out: dict[str, torch.Tensor] = {}
    _walk(obj, "", out, [], [0])
    return out


def _walk(obj: StandIn, prefix: str, out: dict[str, torch.Tensor], stack: list[int], visits: list[int]) -> None:
    visits[0] += 1
    if len(stack) >= _MAX_DEPTH or id(obj) in stack or visits[0] > _MAX_VISITS:
        raise CheckpointError(f"pickled module {stand_in_class(obj)} at {prefix!r} is nested too deep, in a cycle, "
                              f"or shared too often; re-export the checkpoint as a state dict")
    state = obj.__dict__["_tvq_state"]
    skip = state.get("_non_persistent_buffers_set")
    skip = skip if isinstance(skip, (set, frozenset)) else set()
    entries = list(state["_parameters"].items())
    buffers = state.get("_buffers")
    if isinstance(buffers, Mapping):
        entries += [(k, v) for k, v in buffers.items() if k not in skip]
    for name, value in entries:
        if isinstance(name, str) and isinstance(value, torch.Tensor):
            out[prefix + name] = value.detach()
    stack.append(id(obj))
    for name, child in state["_modules"].items():
        if isinstance(name, str) and is_module(child):
            _walk(child, f"{prefix}{name}.", out, stack, visits)
    stack.pop()


def describe(obj: Any) -> str:
    """One line on what a loaded object is, e.g. ``"src.modeling.ImageEncoder (module, 152 tensors; model:
    open_clip.model.CLIP)"``."""
    origin = stand_in_class(obj)
    if origin is None:
        return type(obj).__name__ + (f" ({len(obj)} entries)" if isinstance(obj, Mapping) else "")
    if not is_module(obj):
        return origin
    children = ", ".join(f"{k}: {stand_in_class(v)}" for k, v in list(obj.__dict__["_tvq_state"]["_modules"].items())[:4])
    return f"{origin} (module, {len(module_state_dict(obj))} tensors" + (f"; {children})" if children else ")")
