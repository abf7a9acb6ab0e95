"""The scheme registry (timm's ``register_*`` / ``create_*`` / ``list_*`` pattern).

A scheme is a :class:`~.base.Scheme` subclass registered under its ``name``; a store's
``StoreConfig.scheme`` is that name, and every module that writes, reads, merges, adapts or
allocates bits looks the object up here instead of branching on the name.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ...errors import QuantConfigError

if TYPE_CHECKING:
    from .base import Scheme

_CLASSES: dict[str, type["Scheme"]] = {}
_INSTANCES: dict[str, "Scheme"] = {}


def register_scheme(cls: type["Scheme"] | None = None, *, overwrite: bool = False):
    """Register a :class:`~.base.Scheme` subclass under ``cls.name``; usable as a decorator.

    ``overwrite=False`` (default) refuses a name that is taken. Returns the class.
    """
    def deco(c: type["Scheme"]) -> type["Scheme"]:
        name = getattr(c, "name", "")
        if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
            raise QuantConfigError(f"scheme class {c.__name__} needs a lower-case identifier as its name, got {name!r}")
        if name in _CLASSES and not overwrite and _CLASSES[name] is not c:
            raise QuantConfigError(f"scheme {name!r} is already registered ({_CLASSES[name].__name__}); "
                                   f"pass overwrite=True or choose another name")
        _CLASSES[name] = c
        _INSTANCES.pop(name, None)
        return c

    return deco if cls is None else deco(cls)


def unregister_scheme(name: str) -> None:
    """Remove ``name`` from the registry (a scheme registered by a test or a plug-in)."""
    _CLASSES.pop(name, None)
    _INSTANCES.pop(name, None)


@contextlib.contextmanager
def registered_scheme(cls: type["Scheme"]) -> Iterator[type["Scheme"]]:
    """Register ``cls`` for the duration of a ``with`` block (it is removed afterwards)."""
    previous = _CLASSES.get(cls.name)
    register_scheme(cls, overwrite=True)
    try:
        yield cls
    finally:
        unregister_scheme(cls.name)
        if previous is not None:
            register_scheme(previous)


def list_schemes() -> list[str]:
    """Registered scheme names, in registration order (the built-ins first)."""
    return list(_CLASSES)


def _unknown(name: object) -> QuantConfigError:
    return QuantConfigError(f"scheme {name!r} is unknown: choose one of {', '.join(_CLASSES)}")


def create_scheme(name: str) -> "Scheme":
    """A new instance of the scheme registered as ``name``."""
    cls = _CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise _unknown(name)
    return cls()


def get_scheme(name: str) -> "Scheme":
    """The shared (stateless) instance of scheme ``name``."""
    inst = _INSTANCES.get(name) if isinstance(name, str) else None
    if inst is None:
        inst = _INSTANCES[name] = create_scheme(name)
    return inst


def is_scheme(name: object) -> bool:
    return isinstance(name, str) and name in _CLASSES
