"""One config language for ``tvq quantize``, ``tvq merge`` and ``tvq demo``: jsonargparse options
generated from the frozen dataclasses (and function signatures) those commands call.

Each field becomes ``--name`` (plus ``--dashed-name`` when the name has underscores) with the
field's type hint, default and documentation, so ``--help`` shows ``(type: int, default: 4)`` from
the dataclass itself and jsonargparse does every conversion and check. The same parser reads YAML
(``-c FILE``) and prints it (``--print_config``, which re-runs as is). Conventions on top:

- a ``bool`` option is a flag (``--symmetric``), takes ``true``/``false`` (``--symmetric false``)
  and, when it defaults to true, has a negative form (``--no-error-correction``);
- an option whose type holds a sequence takes its values space-separated too
  (``--lambdas 0.2 0.4`` is ``--lambdas [0.2,0.4]``);
- every parse error is a :class:`~tvq_lightning.errors.UsageError` with a one-line message (the
  ``tvq`` entry point prints ``tvq: error: ...`` and exits 2), never jsonargparse's usage dump.

:func:`parse_two_pass` parses a command line twice when the options of the second parser depend on
the first result (the chosen merging method; an existing store's settings as defaults).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from jsonargparse import ArgumentParser, Namespace

from ..errors import UsageError

ChoiceFn = Callable[[], Iterable[str]]


def dashed(name: str) -> str:
    return name.replace("_", "-")


def type_name(tp: Any) -> str:
    """A type hint in words: ``int``, ``float or null``, ``one of a, b``, ``a list of float``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names + (["null"] if type(None) in args else []))
    if tp in (tuple, list) or origin in (tuple, list):
        elems = {a for a in args if a is not Ellipsis}
        return "a list" + (f" of {type_name(elems.pop())}" if len(elems) == 1 else "")
    return getattr(tp, "__name__", str(tp))


def is_sequence(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(is_sequence(a) for a in typing.get_args(tp))
    return tp in (tuple, list) or origin in (tuple, list)


def _plain(text: str) -> str:
    """Docstring text for a help line: one line, without reST roles and literals."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "")
    return " ".join(text.split())


def _docs(obj: Any) -> dict[str, str]:
    """Per-name documentation: the docstring's ``Args:``/``Attributes:`` entries (``a, b: text``
    documents both), else the field's trailing ``# comment`` in the source."""
    import docstring_parser

    out: dict[str, str] = {}
    for p in docstring_parser.parse(inspect.getdoc(obj) or "").params:
        for name in p.arg_name.split(","):
            out[name.strip()] = _plain(p.description or "")
    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError):
        return out
    for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", source, re.M):
        out.setdefault(m.group(1), _plain(m.group(2)))
    return out


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj)
    except NameError:  # a name only imported for type checking: resolve what resolves
        glb = getattr(inspect.unwrap(obj), "__globals__", {})
        out = {}
        for name, ann in getattr(obj, "__annotations__", {}).items():
            try:
                out[name] = eval(ann, glb) if isinstance(ann, str) else ann  # noqa: S307 - our own annotations
            except NameError:
                continue
        return out


def signature_params(obj: Any) -> list[tuple[str, Any, Any]]:
    """``(name, type hint, default)`` of a dataclass's fields or a function's parameters."""
    hints = _hints(obj)
    if dataclasses.is_dataclass(obj):
        out = []
        for f in dataclasses.fields(obj):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out.append((f.name, hints.get(f.name, Any), default))
        return out
    return [(p.name, hints.get(p.name, Any), p.default) for p in inspect.signature(obj).parameters.values()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


class OptionsParser(ArgumentParser):
    """A jsonargparse parser that knows each option's type and raises one-line :class:`UsageError`s."""

    def __init__(self, prog: str, description: str | None = None, epilog: str | None = None) -> None:
        super().__init__(prog=prog, description=description, epilog=epilog, exit_on_error=False)
        self.hints: dict[str, Any] = {}
        #: the message for an unknown option (e.g. naming the chosen method's options); None: generic
        self.unknown_option: Callable[[str], str] | None = None
        self.add_argument("-c", "--config", action="config",
                          help="a YAML file of these options (as --print_config prints them); options after it override it")

    def option(self, name: str, tp: Any, default: Any = None, help: str = "", *, required: bool = False,
               group: Any = None, aliases: Sequence[str] = (), negative: bool | None = None, **kw: Any) -> None:
        """``--name`` (and ``--dashed-name``, ``aliases``) of type ``tp``. A bool is a flag, with a
        ``--no-dashed-name`` form when ``negative`` (default: when the default is True)."""
        target = group or self
        names = [f"--{name}"] + ([f"--{dashed(name)}"] if "_" in name else []) + list(aliases)
        if tp is bool:
            kw.update(nargs="?", const=True)
        target.add_argument(*names, type=tp, default=default, help=help, required=required, **kw)
        if tp is bool and (default is True if negative is None else negative):
            target.add_argument(f"--no-{dashed(name)}", dest=name, action="store_false", default=argparse.SUPPRESS,
                                help=f"same as --{name} false")
        self.hints[name] = tp

    def add_options(self, obj: Any, *, only: Sequence[str] | None = None, defaults: Mapping[str, Any] | None = None,
                    choices: Mapping[str, ChoiceFn] | None = None, title: str | None = None,
                    help: Mapping[str, str] | None = None, required: Iterable[str] = (),
                    aliases: Mapping[str, Sequence[str]] | None = None, types: Mapping[str, Any] | None = None
                    ) -> list[str]:
        """One option per field of dataclass ``obj`` (or parameter of function ``obj``).

        ``only``: these names, in this order; ``defaults``: replace the declared defaults;
        ``choices``: name -> function listing the valid values (called now: the option's type
        becomes their ``Literal``); ``help``: text for names the docstring does not document;
        ``aliases``: name -> more option strings; ``types``: name -> the type to parse (where the
        declared one is wider than a command line needs). Returns the names added.
        """
        params = {name: (tp, default) for name, tp, default in signature_params(obj)}
        docs = {**_docs(obj), **(help or {})}
        group = self.add_argument_group(title) if title else None
        names = list(only) if only is not None else list(params)
        for name in names:
            tp, declared = params[name]
            tp = (types or {}).get(name, tp)
            if choices and name in choices:
                tp = Literal[tuple(choices[name]())]
            default = defaults[name] if defaults and name in defaults else declared
            doc = docs.get(name) or f"{obj.__name__}.{name}"  # jsonargparse shows type and default only after a text
            self.option(name, tp, None if default is inspect.Parameter.empty else default, doc,
                        required=name in required, group=group, aliases=(aliases or {}).get(name, ()),
                        negative=declared is True)
        return names

    def option_strings(self) -> list[str]:
        return [s for a in self._actions for s in a.option_strings]

    def parse(self, argv: Sequence[str]) -> Namespace:
        """Parse ``argv``; mapping-valued options are applied after the rest (:mod:`.mapping_options`)."""
        from .mapping_options import apply_mapping_edits, take_mapping_options

        mappings = [n for n, tp in self.hints.items() if typing.get_origin(tp) in (dict, Mapping) or tp is dict]
        argv, edits = take_mapping_options(list(argv), mappings)
        printing = [a for a in argv if a.split("=")[0] == "--print_config"] if edits else []
        argv = [a for a in argv if a not in printing]
        try:
            ns = self.parse_args(self._join_sequences(argv))
        except argparse.ArgumentError as e:
            raise UsageError(self.one_line(str(e))) from None
        for name, value in apply_mapping_edits({n: ns.get(n) for n in mappings}, edits).items():
            if typing.get_args(self.hints[name])[1:] == (str,):   # dict[str, str]: paths, names
                value = {str(k): str(v) for k, v in value.items()}
            ns[name] = value
        if printing:
            print(self.dump(ns, skip_validation=True), end="")
            raise SystemExit(0)
        return ns

    def _join_sequences(self, argv: list[str]) -> list[str]:
        """``--opt a b`` -> ``--opt=[a, b]`` for options whose type holds a sequence."""
        seq = {s for name, tp in self.hints.items() if is_sequence(tp) for s in (f"--{name}", f"--{dashed(name)}")}
        out, i = [], 0
        while i < len(argv):
            out.append(argv[i])
            j = i + 1
            if argv[i] in seq:
                while j < len(argv) and not _is_option(argv[j]):
                    j += 1
                if j - i > 2:
                    out[-1] = f"{argv[i]}=[{', '.join(argv[i + 1:j])}]"
                else:
                    j = i + 1
            i = j
        return out

    def one_line(self, message: str) -> str:
        return format_error(message, self, self.hints, self.unknown_option)


def format_error(message: str, parser: ArgumentParser, hints: Mapping[str, Any] | None = None,
                 unknown_option: Callable[[str], str] | None = None) -> str:
    """A jsonargparse error ``message`` of ``parser`` as one line: the option, what it expects, the fix.

    ``hints``: option name -> type, for the options whose type is known (else the type is read
    from the message); ``unknown_option``: the message for an option the parser does not have.
    An error inside a ``class_path``'s ``init_args`` (LightningCLI configs) names the nested key.
    """
    prog = parser.prog.replace(" [options]", "")
    outer = re.match(r'Parser key "([^"]+)"', message)
    inner = re.search(r"Problem with given class_path '([^']+)':\s*\n(.*?)(?=\n\s*- |\n\s*Given value|\Z)", message, re.S)
    if outer and inner:
        prefix = f"{outer.group(1)}.init_args."
        keys = [prefix + name for name in _init_params(inner.group(1))]
        return _one_line(inner.group(2), prog, keys, ["--" + k for k in keys], {}, None, prefix)
    keys = [a.dest for a in parser._actions if a.option_strings]
    options = [s for a in parser._actions for s in a.option_strings]
    return _one_line(message, prog, keys, options, hints or {}, unknown_option)


def _init_params(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    except (ImportError, AttributeError, TypeError, ValueError):
        return []


def _one_line(message: str, prog: str, keys: list[str], options: list[str], hints: Mapping[str, Any],
              unknown_option: Callable[[str], str] | None, prefix: str = "") -> str:
    see = f"`{prog} --help` lists the options"

    def flag(name: str) -> str:
        return "--" + (dashed(name) if name in hints else prefix + name)

    def closest(name: str, among: list[str]) -> str:
        found = difflib.get_close_matches(name, among, n=1)
        return f" (did you mean {found[0]}?)" if found else ""

    m = re.match(r'\s*Parser key "([^"]+)"(?: element \d+)?:?', message)
    if m and m.group(1) == "config":
        return "-c/--config: " + _squash(message[m.end():])
    if m:
        name, rest = m.group(1), message[m.end():]
        got = re.search(r"Got value: (.*)", rest)
        value = got.group(1).strip() if got else None
        tp = hints.get(name)
        if typing.get_origin(tp) is Literal:
            return f"{flag(name)} {value!r}: choose one of {', '.join(map(str, typing.get_args(tp)))}"
        expected = type_name(tp) if tp is not None else None
        if expected is None and (e := re.search(r"Expected a <class '([\w.]+)'>", rest)):
            expected = e.group(1)
        if expected and value is not None:
            return f"{flag(name)} expects {expected}: {value!r} is not a valid {expected}"
        return f"{flag(name)}: {_squash(rest)}"
    m = re.match(r"unrecognized arguments: (\S+)", message)
    if m:
        opt = m.group(1).split("=")[0]
        if unknown_option is not None and opt.startswith("--"):
            return unknown_option(opt)
        return f"{prog}: unrecognized option {m.group(1)}{closest(opt, options)}; {see}"
    m = re.match(r"the following arguments are required: (.*)", message)
    if m:
        names = ", ".join(flag(n.strip()) for n in m.group(1).split(","))
        return f"{prog}: {names} required; {see}"
    m = re.search(r"(?:(?:Option|Key) '([^']+)' is not (?:accepted|expected)|does not accept option '([^']+)')", message)
    if m:
        name = prefix + (m.group(1) or m.group(2))
        return f"{prog}: unknown option {name!r}{closest(name, keys)}; {see}"
    return f"{prog}: " + _squash(message)


def _is_option(token: str) -> bool:
    if not token.startswith("-") or token == "-":
        return False
    try:
        float(token)
        return False
    except ValueError:
        return True


def _squash(text: str) -> str:
    return " ".join(ln.strip() for ln in text.splitlines() if ln.strip())


def build_dataclass(cls: type, ns: Namespace) -> Any:
    """``cls`` from the options :meth:`OptionsParser.add_options` added for it."""
    return cls(**{f.name: ns[f.name] for f in dataclasses.fields(cls) if f.name in ns})


def apply_overrides(obj: Any, pairs: Sequence[str], *, flag: str = "--set", exclude: Iterable[str] = ()) -> Any:
    """A copy of dataclass instance ``obj`` with ``KEY=VALUE`` settings, each typed and checked by the
    option :meth:`OptionsParser.add_options` makes for the field (a sequence: comma-separated values)."""
    names = [f.name for f in dataclasses.fields(obj) if f.name not in set(exclude)]
    parser = OptionsParser(f"{flag} KEY=VALUE")
    parser.add_options(type(obj), only=names, defaults={n: getattr(obj, n) for n in names})
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]}?)" if close and sep else ""
            raise UsageError(f"{flag} {pair!r}: give KEY=VALUE{hint} with KEY one of {', '.join(names)}")
        if is_sequence(parser.hints[key]) and not value.lstrip().startswith("["):
            value = f"[{value}]"
        try:
            changes[key] = parser.parse([f"--{key}={value}"])[key]
        except UsageError as e:
            raise UsageError(f"{flag} {pair!r}: {e}") from None
    return dataclasses.replace(obj, **changes)


_META = ("-h", "--help", "--print_config")


def parse_two_pass(argv: Sequence[str], build: Callable[[Namespace | None], OptionsParser]) -> Namespace:
    """Parse ``argv`` with ``build(None)`` (lenient: nothing required; help and ``--print_config``
    left out), then with ``build(first_result)``, whose options or defaults may depend on it.
    An error of the first pass is reported by the second (``build(None)`` is used again)."""
    argv = list(argv)
    lenient = build(None)
    try:
        first = lenient.parse(_known_only(argv, set(lenient.option_strings()) - set(_META)))
    except UsageError:
        first = None
    return build(first).parse(argv)


def _known_only(argv: list[str], known: set[str]) -> list[str]:
    """``argv`` without the options not in ``known`` (and their values): the second pass reports them."""
    out, skipping = [], False
    for token in argv:
        if _is_option(token):
            skipping = token.split("=")[0] not in known
        if not skipping:
            out.append(token)
    return out
