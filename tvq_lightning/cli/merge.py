"""``tvq merge``: merge a store's task vectors into a model (or a per-task artifact)."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

from ..errors import TvqError
from ..merging.engine import plan_merge
from ..merging.output import write_merged, write_per_task
from ..merging.registry import get_merger_class, list_mergers
from ._common import add_checkpoint_options


def _method_fields() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """Option name -> [(method, field)] over every registered method."""
    out: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for name in list_mergers():
        for f in dataclasses.fields(get_merger_class(name).Config):
            out.setdefault(f.name, []).append((name, f))
    return out


def add_parser(sub) -> None:
    p = sub.add_parser(
        "merge", help="merge task vectors from a store",
        description="Merge the task vectors of a store into theta_0, key by key (memory independent of the "
                    "number of tasks). Single-model methods write a complete state dict; per-task methods "
                    "(" + ", ".join(list_mergers(per_task=True)) + ") write a compact artifact directory that "
                    "`tvq export --store ARTIFACT --task NAME` turns into a task's model.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True, metavar="PATH", help="theta_0 (must be the store's)")
    p.add_argument("--store", required=True, metavar="STORE")
    p.add_argument("--method", required=True, metavar="NAME", help="one of: " + ", ".join(list_mergers()))
    p.add_argument("--tasks", nargs="+", metavar="NAME", help="merge only these tasks (default: all)")
    p.add_argument("--device", default="cpu", help="device the per-key merge runs on (e.g. cuda)")
    p.add_argument("--out", required=True, metavar="MERGED.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true")
    add_checkpoint_options(p)
    g = p.add_argument_group("method options (each applies to the methods named)")
    for opt, uses in sorted(_method_fields().items()):
        methods = ", ".join(f"{m} (default {f.default!r})" for m, f in uses)
        g.add_argument("--" + opt.replace("_", "-"), dest="opt_" + opt, nargs="+", default=argparse.SUPPRESS,
                       metavar="V", help=methods)
    p.set_defaults(func=run)


def _coerce(method: str, name: str, values: list[str]):
    cls = get_merger_class(method)
    hints = typing.get_type_hints(cls.Config)
    tp = hints[name]
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def one(v: str, t):
        o = typing.get_origin(t)
        if o is typing.Literal:
            if v not in typing.get_args(t):
                raise TvqError(f"--{name.replace('_', '-')} {v!r}: choose one of {', '.join(map(str, typing.get_args(t)))}")
            return v
        if t is bool:
            if v.lower() in ("1", "true", "yes"):
                return True
            if v.lower() in ("0", "false", "no"):
                return False
            raise TvqError(f"--{name.replace('_', '-')} expects true or false, got {v!r}")
        if t in (int, float, str):
            try:
                return t(v)
            except ValueError:
                raise TvqError(f"--{name.replace('_', '-')} expects {t.__name__}, got {v!r}") from None
        return v

    if origin in (list, tuple) or (origin is typing.Union and any(typing.get_origin(a) in (list, tuple) for a in args)):
        elem = next((typing.get_args(a)[0] for a in ([tp] if origin in (list, tuple) else args) if typing.get_origin(a) in (list, tuple)), float)
        scalar = next((a for a in args if a not in (type(None),) and typing.get_origin(a) not in (list, tuple)), None)
        if len(values) == 1 and scalar is not None:
            return one(values[0], scalar)
        return tuple(one(v, elem) for v in values)
    if len(values) != 1:
        raise TvqError(f"--{name.replace('_', '-')} takes one value, got {len(values)}")
    if origin is typing.Union:
        t = next(a for a in args if a is not type(None))
        if values[0].lower() == "none":
            return None
        return one(values[0], t)
    return one(values[0], tp)


def run(args: argparse.Namespace) -> int:
    method = args.method
    get_merger_class(method)  # unknown method -> clear error
    fields = {f.name for f in dataclasses.fields(get_merger_class(method).Config)}
    options = {}
    for key, values in vars(args).items():
        if not key.startswith("opt_"):
            continue
        name = key[4:]
        if name not in fields:
            raise TvqError(f"method {method!r} has no option --{name.replace('_', '-')}; its options are: "
                           + (", ".join("--" + f.replace("_", "-") for f in sorted(fields)) or "(none)"))
        options[name] = _coerce(method, name, values)
    out = Path(args.out)
    plan = plan_merge(args.store, args.pretrained, method, tasks=args.tasks, device=args.device, prefix=args.prefix,
                      allow_pickle=args.allow_pickle, progress=not args.quiet, **options)
    if plan.merger.per_task:
        if out.suffix == ".safetensors":
            raise TvqError(f"{method} gives one model per task: --out must be a directory, not {out}")
        info = write_per_task(plan, out, overwrite=args.overwrite)
    else:
        info = write_merged(plan, out, overwrite=args.overwrite)
    print(f"merged {len(plan.tasks)} task(s) of {plan.store.path} with {info['method']} into {out} "
          f"({info['bytes']:,} bytes, {info['seconds']:.1f} s)")
    return 0
