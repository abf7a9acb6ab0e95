"""Merging methods by name (the timm pattern): ``register_merger``, ``create_merger``, ``list_mergers``.

Each method is a :class:`~.base.Merger` subclass with a frozen dataclass ``Config`` whose
defaults are docs/algorithms.md's. ``create_merger("ties", scaling=0.4, k=0.2)`` checks the options
against the config's fields and raises a one-line error naming the valid ones.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

from ..errors import OptionError, TvqError

_MERGERS: dict[str, type] = {}


def register_merger(name: str):
    """Class decorator: make a :class:`Merger` available as ``name``."""
    def deco(cls):
        if name in _MERGERS and _MERGERS[name] is not cls:
            raise ValueError(f"merger {name!r} is already registered")
        cls.name = name
        _MERGERS[name] = cls
        return cls
    return deco


def list_mergers(per_task: bool | None = None) -> list[str]:
    """Registered names; ``per_task=True`` lists only methods that give one model per task."""
    _load_builtin()
    return sorted(n for n, c in _MERGERS.items() if per_task is None or c.per_task == per_task)


def get_merger_class(name: str) -> type:
    _load_builtin()
    try:
        return _MERGERS[name]
    except KeyError:
        close = difflib.get_close_matches(name, _MERGERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TvqError(f"unknown merging method {name!r}{hint}; choose one of {', '.join(sorted(_MERGERS))}") from None


def config_fields(name: str) -> list[dataclasses.Field]:
    return list(dataclasses.fields(get_merger_class(name).Config))


def create_merger(name: str, **options: Any):
    """An instance of method ``name`` with its config's defaults overridden by ``options``."""
    cls = get_merger_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = [k for k in options if k not in fields]
    if unknown:
        raise TvqError(f"method {name!r} has no option {unknown[0]!r}; its options are: {', '.join(sorted(fields)) or '(none)'}")
    try:
        cfg = cls.Config(**options)
    except (TypeError, ValueError) as e:
        raise OptionError(f"method {name!r}: {e}") from None
    check_config(name, cfg)
    return cls(cfg)


def check_config(name: str, config: Any) -> None:
    """Every number among a method's options (and inside list options) must be finite: a NaN or
    infinite ``scaling`` would write an all-NaN model."""
    if not dataclasses.is_dataclass(config):
        return
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise OptionError(f"method {name!r}: option {f.name}={value!r} is not a finite number; give a real "
                                  f"value (e.g. --{f.name.replace('_', '-')} 0.3)")


def _load_builtin() -> None:
    from . import methods  # noqa: F401  (registers the built-in methods)
