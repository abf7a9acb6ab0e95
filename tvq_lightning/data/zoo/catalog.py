"""The class names and prompt templates of the CLIP model-merging tasks, as package data.

Each task is one JSON file under ``classnames/``::

    {"name": "EuroSAT", "aliases": [...], "classnames": [...], "templates": [...], "source": "..."}

``classnames`` are in the label-index order of the dataset (index ``i`` of the list is label
``i``), ``templates`` are the per-dataset prompts of the CLIP paper (each holds one ``{}`` for the
class name) and ``source`` says where the names, their order and the templates come from.

The suites of the literature (task arithmetic, TALL masks, TVQ, FusionBench) are
:data:`SUITES`: ``"8"``, ``"14"`` and ``"20"`` tasks, in the usual order. Names are looked up
case-insensitively and without punctuation, so ``stanford-cars``, ``StanfordCars`` and ``cars``
are one task. :func:`load_task_file` reads a custom task from a JSON file of the same form.
"""
from __future__ import annotations

import difflib
import json
import re
import string
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ...errors import TvqError

__all__ = ["SUITES", "TaskInfo", "TaskSpecError", "UnknownTaskError", "get_task", "list_tasks", "load_task_file",
           "task_from_dict"]


class UnknownTaskError(TvqError):
    """A task name that is neither a catalog task nor one of their aliases."""


class TaskSpecError(TvqError, ValueError):
    """A task's JSON (class names, templates) that cannot make a zero-shot head."""


_EIGHT = ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")
_FOURTEEN = _EIGHT + ("PCAM", "CIFAR100", "STL10", "OxfordIIITPet", "Flowers102", "FER2013")
_TWENTY = _FOURTEEN + ("CIFAR10", "Food101", "RenderedSST2", "EMNIST", "FashionMNIST", "KMNIST")

#: suite name -> its tasks, in the order of the papers' tables
SUITES: dict[str, tuple[str, ...]] = {"8": _EIGHT, "14": _FOURTEEN, "20": _TWENTY}

#: the template of a custom task that gives none (CLIP's basic prompt)
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

_KEYS = ("name", "aliases", "classnames", "templates", "source")


@dataclass(frozen=True)
class TaskInfo:
    """One classification task: its class names (label order) and prompt templates.

    Attributes:
        name: the canonical name (the head's file stem: ``<name>.safetensors``).
        aliases: other names it is known by.
        classnames: one name per label index.
        templates: prompts with one ``{}`` each for the class name.
        source: where the names, their order and the templates come from.
    """

    name: str
    aliases: tuple[str, ...]
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self, classname: str) -> list[str]:
        """Every template filled with ``classname``."""
        return [t.format(classname) for t in self.templates]


def _key(name: str) -> str:
    """A name as looked up: lower case, letters and digits only (``Stanford-Cars`` -> ``stanfordcars``)."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _template_error(template: str) -> str | None:
    """Why ``template`` cannot be filled with a class name, or None."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:  # a lone '{' or '}'
        return f"is not a format string ({e}); write literal braces as '{{{{' and '}}}}'"
    if fields != [""]:
        if not fields:
            return "has no '{}' for the class name; write e.g. 'a photo of a {}.'"
        return "needs exactly one '{}' (for the class name) and no other fields"
    return None


def task_from_dict(data: Any, where: str, default_name: str | None = None) -> TaskInfo:
    """A :class:`TaskInfo` from a task's JSON object, checked; ``where`` names it in errors.

    ``name`` defaults to ``default_name``; ``templates`` to :data:`DEFAULT_TEMPLATES`.
    """
    if not isinstance(data, dict):
        raise TaskSpecError(f"{where}: a task is a JSON object with 'classnames' and 'templates', "
                            f"not a {type(data).__name__}")
    unknown = [k for k in data if k not in _KEYS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], _KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TaskSpecError(f"{where}: unknown key {unknown[0]!r}{hint}; a task has the keys {', '.join(_KEYS)}")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise TaskSpecError(f"{where}: 'name' must be a non-empty string")
    names = data.get("classnames")
    if not isinstance(names, list) or not names:
        raise TaskSpecError(f"{where}: 'classnames' must be a non-empty list of strings, one per label index")
    for i, c in enumerate(names):
        if not isinstance(c, str) or not c.strip():
            raise TaskSpecError(f"{where}: classnames[{i}] must be a non-empty string, not {c!r}")
    seen: dict[str, int] = {}
    for i, c in enumerate(names):
        if c in seen:
            raise TaskSpecError(f"{where}: classnames[{i}] {c!r} repeats classnames[{seen[c]}]; every class needs "
                                f"its own name")
        seen[c] = i
    templates = data.get("templates", list(DEFAULT_TEMPLATES))
    if not isinstance(templates, list) or not templates:
        raise TaskSpecError(f"{where}: 'templates' must be a non-empty list of strings with one '{{}}' each "
                            f"(e.g. [\"a photo of a {{}}.\"])")
    for i, t in enumerate(templates):
        if not isinstance(t, str):
            raise TaskSpecError(f"{where}: templates[{i}] must be a string, not {t!r}")
        why = _template_error(t)
        if why:
            raise TaskSpecError(f"{where}: templates[{i}] {t!r} {why}")
    aliases = data.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise TaskSpecError(f"{where}: 'aliases' must be a list of non-empty strings")
    source = data.get("source", "")
    if not isinstance(source, str):
        raise TaskSpecError(f"{where}: 'source' must be a string")
    return TaskInfo(name.strip(), tuple(aliases), tuple(names), tuple(templates), source)


def load_task_file(path: str | Path) -> TaskInfo:
    """A custom task from a JSON file (``classnames`` required; ``name`` defaults to the file stem,
    ``templates`` to ``["a photo of a {}."]``)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskSpecError(f"{p}: no such task file; give a JSON file with 'classnames' and 'templates' "
                            f"or a catalog task name") from None
    except IsADirectoryError:
        raise TaskSpecError(f"{p} is a directory; give a task's JSON file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TaskSpecError(f"{p}: cannot be read as UTF-8 text ({e}); give a task's JSON file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TaskSpecError(f"{p}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    return task_from_dict(data, str(p), default_name=p.stem)


@lru_cache(maxsize=1)
def _catalog() -> tuple[dict[str, TaskInfo], dict[str, str]]:
    """(canonical name -> task, lookup key -> canonical name), read once from the package data."""
    tasks: dict[str, TaskInfo] = {}
    keys: dict[str, str] = {}
    folder = resources.files(__package__).joinpath("classnames")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        where = f"tvq_lightning/data/zoo/classnames/{entry.name}"
        task = task_from_dict(json.loads(entry.read_text(encoding="utf-8")), where)
        tasks[task.name] = task
        for alias in (task.name, *task.aliases):
            other = keys.setdefault(_key(alias), task.name)
            if other != task.name:
                raise TvqError(f"{where}: name {alias!r} is also a name of {other}; the package data is damaged")
    missing = [n for n in _TWENTY if n not in tasks]
    if missing:
        raise TvqError(f"the task catalog lacks {', '.join(missing)} (tvq_lightning/data/zoo/classnames); "
                       f"reinstall tvq_lightning")
    return tasks, keys


def list_tasks(suite: str | None = None) -> list[str]:
    """The tasks of ``suite`` (``"8"``, ``"14"``, ``"20"``) in order; None: every catalog task
    (the 20, then the others by name)."""
    tasks, _ = _catalog()
    if suite is None:
        return list(_TWENTY) + sorted(n for n in tasks if n not in _TWENTY)
    key = str(suite)
    if key not in SUITES:
        raise UnknownTaskError(f"unknown suite {suite!r}: choose one of {', '.join(SUITES)}")
    return list(SUITES[key])


def get_task(name: str) -> TaskInfo:
    """The catalog task called ``name`` or one of its aliases (case and punctuation ignored)."""
    tasks, keys = _catalog()
    found = keys.get(_key(str(name)))
    if found is not None:
        return tasks[found]
    close = difflib.get_close_matches(_key(str(name)), list(keys), n=3, cutoff=0.6)
    names = list(dict.fromkeys(keys[c] for c in close))
    hint = f"did you mean {' or '.join(names)}? " if names else ""
    raise UnknownTaskError(f"unknown task {name!r}: {hint}the catalog has {', '.join(list_tasks())} "
                           f"(or give a JSON file with 'classnames' and 'templates')")
