"""Mapping-valued options (``--data``, ``--encoder``, ``--trainer`` of ``tvq sweep``, ...) set on the
command line after a ``-c`` config, LightningCLI-style.

jsonargparse treats a mapping with a ``class_path`` as a class specification: given both in a config
file and on the command line it fails inside its own code, and ``--data.init_args.root X`` lands at
``data.root``. These options are therefore taken out of the command line before jsonargparse sees it
and applied, in order, to the parsed value:

- ``--data '{class_path: ..., init_args: {...}}'`` replaces the whole mapping;
- ``--data.init_args.root /x`` (or ``--data.init_args.root=/x``) sets one nested entry, creating the
  levels it needs; a first level the mapping lacks goes under its ``init_args`` when it has one, so
  ``--data.root /x`` means the same as ``--data.init_args.root /x``; ``--trainer.devices 2`` sets
  ``trainer.devices``.

Values are read as YAML (``2`` is a number, ``[a, b]`` a list, ``/x`` a string).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import yaml

from ..errors import UsageError

Edit = tuple[str, tuple[str, ...], str]   # (option name, nested path (empty: the whole mapping), raw value)


def take_mapping_options(argv: list[str], names: Iterable[str]) -> tuple[list[str], list[Edit]]:
    """``argv`` without the options of the mapping-valued ``names`` (and their values), and those
    options as edits in command-line order."""
    names = set(names)
    out: list[str] = []
    edits: list[Edit] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        head, eq, raw = token.partition("=")
        name, _, rest = head[2:].partition(".") if head.startswith("--") else ("", "", "")
        name = name.replace("-", "_")
        if not head.startswith("--") or name not in names:
            out.append(token)
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv):
                raise UsageError(f"{head} expects a value")
            raw = argv[i + 1]
            i += 1
        path = tuple(rest.split(".")) if rest else ()
        if any(not p for p in path):
            raise UsageError(f"{head}: an empty key in the dotted path; write e.g. --{name}.init_args.root VALUE")
        edits.append((name, path, raw))
        i += 1
    return out, edits


def apply_mapping_edits(values: dict[str, Any], edits: list[Edit]) -> dict[str, Any]:
    """``{name: new mapping}`` for every name the edits touch, starting from ``values[name]``."""
    out: dict[str, Any] = {}
    for name, path, raw in edits:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise UsageError(f"--{'.'.join((name, *path))}: {raw!r} is not valid YAML ({_first_line(e)})") from None
        if not path:
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise UsageError(f"--{name} expects a mapping such as '{{key: value}}', got {raw!r}")
            out[name] = value
            continue
        current = out.get(name, values.get(name))
        target = copy.deepcopy(current) if isinstance(current, dict) else {}
        out[name] = target
        node = target
        if path[0] not in node and isinstance(node.get("init_args"), dict):
            node = node["init_args"]
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[path[-1]] = value
    return out


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
