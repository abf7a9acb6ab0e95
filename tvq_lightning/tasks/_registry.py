"""Task types by name: ``register_task_type``, ``create_task_type``, ``get_task_type``, ``list_task_types``.

A task type is a :class:`~.base.TaskType` subclass registered under a name (``"classification"``);
modules take the name per task (``task_types: classification`` or ``{seg: segmentation, ...}``)
and build one instance per task with :func:`create_task_type`. Names registered from outside the
package (a test's toy type, a user's own) are removed again with :func:`unregister_task_type`.
"""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import TvqError

_TASK_TYPES: dict[str, type] = {}


def register_task_type(name: str, cls: type | None = None):
    """Make a :class:`~.base.TaskType` subclass available as ``name`` (a class decorator, or
    ``register_task_type(name, cls)``). Registering another class under a taken name is an error."""
    def deco(c: type) -> type:
        from .base import TaskType

        if not (isinstance(c, type) and issubclass(c, TaskType)):
            raise TypeError(f"register_task_type({name!r}): {c!r} is not a TaskType subclass")
        if name in _TASK_TYPES and _TASK_TYPES[name] is not c:
            raise ValueError(f"task type {name!r} is already registered ({_TASK_TYPES[name].__qualname__})")
        c.name = name
        _TASK_TYPES[name] = c
        return c
    return deco if cls is None else deco(cls)


def unregister_task_type(name: str) -> None:
    """Forget ``name`` (no error if it is not registered); built-in types cannot be removed."""
    if name in _BUILTIN:
        raise ValueError(f"task type {name!r} is built in and cannot be unregistered")
    _TASK_TYPES.pop(name, None)


def list_task_types() -> list[str]:
    """The registered names, sorted."""
    _load_builtin()
    return sorted(_TASK_TYPES)


def get_task_type(name: str) -> type:
    """The class registered as ``name`` (:class:`TvqError` naming the known ones otherwise)."""
    _load_builtin()
    try:
        return _TASK_TYPES[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), _TASK_TYPES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TvqError(f"unknown task type {name!r}{hint}; choose one of {', '.join(sorted(_TASK_TYPES))}") from None


def create_task_type(name: str, **options: Any):
    """An instance of the task type ``name`` (``options`` go to its constructor)."""
    cls = get_task_type(name)
    params = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in options if k not in params]
        if unknown:
            raise TvqError(f"task type {name!r} has no option {unknown[0]!r}; its options are: "
                           f"{', '.join(sorted(params)) or '(none)'}")
    return cls(**options)


def resolve_task_types(tasks: Sequence[str], task_types: Any = "classification") -> dict[str, Any]:
    """``{task: TaskType instance}`` in task order, from one name (or instance) for every task or a
    ``{task: name}`` mapping (tasks it leaves out are classification)."""
    from .base import TaskType

    def one(spec: Any):
        return spec if isinstance(spec, TaskType) else create_task_type(spec)

    if isinstance(task_types, Mapping):
        extra = [t for t in task_types if t not in tasks]
        if extra:
            raise TvqError(f"task_types names task {extra[0]!r}, which is not one of the tasks {list(tasks)}")
        return {t: one(task_types.get(t, "classification")) for t in tasks}
    shared = one(task_types)
    return {t: shared for t in tasks}


_BUILTIN = ("classification", "segmentation", "depth", "normal")


def _load_builtin() -> None:
    from . import classification, depth, normal, segmentation  # noqa: F401  (they register themselves)
