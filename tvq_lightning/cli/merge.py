"""``tvq merge``: merge a store's task vectors into a model (or a per-task artifact)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse import Namespace

from ..errors import TvqError, UsageError
from ..merging.engine import plan_merge
from ..merging.output import write_merged, write_per_task
from ..merging.registry import get_merger_class, list_mergers
from .options import OptionsParser, dashed, parse_two_pass, signature_params

HELP = "merge task vectors from a store"


def _description() -> str:
    return ("Merge the task vectors of a store into theta_0, key by key (memory independent of the number of "
            "tasks). Single-model methods write a complete state dict; per-task methods (" +
            ", ".join(list_mergers(per_task=True)) + ") write a compact artifact directory that `tvq export "
            "--store ARTIFACT --task NAME` turns into a task's model. The method's options are its Config's "
            "fields: `tvq merge --method NAME --help` lists them.")


def _all_method_options() -> dict[str, Any]:
    """Option name -> type over every registered method (``Any`` where methods disagree)."""
    out: dict[str, Any] = {}
    for method in list_mergers():
        for name, tp, _ in signature_params(get_merger_class(method).Config):
            out[name] = tp if out.get(name, tp) == tp else Any
    return out


def build_parser(first: Namespace | None = None) -> OptionsParser:
    """The options; after a first pass (``first``), those of the chosen method's ``Config``."""
    method = None if first is None else first.get("method")
    config = None if method is None else get_merger_class(method).Config  # unknown: "did you mean"
    p = OptionsParser("tvq merge", _description())
    required = first is not None
    p.option("pretrained", str, required=required, metavar="PATH", help="theta_0 (must be the store's)")
    p.option("store", str, required=required, metavar="STORE", help="the store of task vectors")
    p.option("method", str, required=required, metavar="NAME", help="one of: " + ", ".join(list_mergers()))
    p.option("tasks", str, None, "merge only these tasks (default: all)", nargs="+", metavar="NAME")
    p.add_options(plan_merge, only=("device",), types={"device": str},
                  help={"device": "device the per-key merge runs on (cpu, cuda, cuda:N)"})
    p.option("out", str, required=required, metavar="MERGED.safetensors|DIR",
             help="the merged state dict, or a directory for per-task methods")
    p.option("overwrite", bool, False, "replace --out if it exists")
    p.option("quiet", bool, False, "no progress bar")
    p.add_options(plan_merge, only=("prefix", "allow_pickle", "trust_pickle_code", "verify"), help={
        "prefix": "keep only keys under this prefix and strip it (e.g. model. for a Lightning .ckpt)",
        "allow_pickle": "accept a theta_0 that is a pickled module (task_vectors' zeroshot.pt); it loads through an "
                        "allow-list of classes and no code from the file runs",
        "trust_pickle_code": "unpickle theta_0 with plain torch.load, which RUNS CODE FROM THE FILE; only for a file "
                             "you trust that --allow-pickle refuses",
        "verify": "check every stored tensor's CRC-32 on first read (--no-verify skips it for a trusted store)"})
    if first is None:  # first pass: every method's options, to find --method wherever it is given
        for name, tp in _all_method_options().items():
            p.option(name, tp, help="(an option of some method)")
    elif config is not None:
        names = p.add_options(config, title=f"{method} options ({config.__name__})")
        valid = ", ".join("--" + dashed(n) for n in names) or "(none)"
        p.unknown_option = lambda opt: f"method {method!r} has no option {opt}; its options are: {valid}"
    return p


def check_device(device: str) -> str:
    """``device`` if this machine can merge on it, else a one-line error naming ``--device`` and the fix."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a device name torch knows; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UsageError(f"--device {device}: CUDA is not available here ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        raise UsageError(f"--device {device}: tvq merge runs on cpu or cuda; use --device cpu or --device cuda")
    return device


def main(argv: Sequence[str]) -> int:
    return run(parse_two_pass(argv, build_parser))


def run(ns: Namespace) -> int:
    method = ns.method
    names = [name for name, _, _ in signature_params(get_merger_class(method).Config)]
    options = {name: ns[name] for name in names}
    out = Path(ns.out)
    plan = plan_merge(ns.store, ns.pretrained, method, tasks=ns.tasks, device=check_device(ns.device), prefix=ns.prefix,
                      allow_pickle=ns.allow_pickle, trust_pickle_code=ns.trust_pickle_code, progress=not ns.quiet,
                      verify=ns.verify, **options)
    if plan.merger.per_task:
        if out.suffix == ".safetensors":
            raise TvqError(f"{method} gives one model per task: --out must be a directory, not {out}")
        info = write_per_task(plan, out, overwrite=ns.overwrite)
    else:
        info = write_merged(plan, out, overwrite=ns.overwrite)
    print(f"merged {len(plan.tasks)} task(s) of {plan.store.path} with {info['method']} into {out} "
          f"({info['bytes']:,} bytes, {info['seconds']:.1f} s)")
    return 0
