"""Build and cache the zero-shot heads of many tasks: ``tvq heads`` and :func:`build_heads`.

Each task's head (:func:`~.zeroshot.zeroshot_head`: the CLIP protocol) is written to
``<out>/<task>.safetensors`` in :class:`~.heads.ClassificationHead`'s format (``weight``,
``bias``), atomically (a temp file, then a rename). Its safetensors metadata holds a fingerprint
of what made it: the model (its weight files' sha256, or the open_clip tag), the class names and
the templates. A later run reuses a head whose fingerprint matches, rebuilds one whose inputs
changed, and refuses to replace a file ``tvq heads`` did not write unless ``overwrite``. The
model is only loaded when some head must be built.

Model sources (``HeadsConfig.source``):

- ``open_clip``: ``model`` is an open_clip name (or the stem of a local JSON config given as
  ``openclip_config``), ``pretrained`` a weights file or an open_clip tag; the tokenizer is
  ``open_clip.get_tokenizer(model)``.
- ``tiny_clip``: the project's tiny CLIP (:mod:`.tiny_clip`); ``pretrained`` is its directory
  (default: the one shipped in the package). Its tokenizer knows only its own vocabulary.
- ``hf_clip``: a Hugging Face ``CLIPModel`` folder (or a cached Hub name) given as ``pretrained``
  (:func:`.hf_clip.hf_clip_text`, which never downloads).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from ..data.zoo import SUITES, TaskInfo, get_task, load_task_file
from ..errors import OutputError, OutputExistsError, TvqError, UsageError
from .heads import ClassificationHead
from .zeroshot import zeroshot_head

__all__ = ["HeadResult", "HeadsConfig", "build_heads", "build_heads_detailed", "head_fingerprint", "read_head_metadata",
           "resolve_tasks"]

FORMAT = "tvq-zeroshot-head/1"
Source = Literal["open_clip", "tiny_clip", "hf_clip"]


@dataclass(frozen=True)
class HeadsConfig:
    """What ``tvq heads`` builds, from which model, and where.

    Attributes:
        out: the heads directory (created if missing); each head is <out>/<task>.safetensors.
        tasks: catalog task names or aliases (SUN397, cars, pets, ...), JSON files of custom tasks
            (classnames, templates), or NAME=TASK_OR_JSON to choose the file name.
        suite: also build every task of this suite of the literature (8, 14 or 20 tasks).
        source: where the text tower comes from: open_clip (--model, --pretrained), tiny_clip (the
            project's tiny CLIP) or hf_clip (a Hugging Face CLIP folder as --pretrained).
        model: the open_clip model name (e.g. ViT-B-32), or the stem of --openclip-config.
        pretrained: open_clip: a weights file or an open_clip tag; tiny_clip: its directory
            (default: the shipped one); hf_clip: the model folder.
        openclip_config: a local open_clip JSON model config (or a directory of them) to register.
        device: where the text tower runs (cpu, cuda, cuda:N).
        overwrite: rebuild every head, even those whose inputs did not change.
        quiet: no progress bar.
    """

    out: str
    tasks: tuple[str, ...] = ()
    suite: str | None = None
    source: Source = "open_clip"
    model: str | None = None
    pretrained: str | None = None
    openclip_config: str | None = None
    device: str = "cpu"
    overwrite: bool = False
    quiet: bool = False


@dataclass(frozen=True)
class HeadResult:
    """One task's head: its file and whether it was ``built``, ``rebuilt`` (inputs changed) or ``reused``."""

    task: TaskInfo
    path: Path
    status: str


def resolve_tasks(cfg: HeadsConfig) -> dict[str, TaskInfo]:
    """File stem -> task, for ``cfg.suite`` then ``cfg.tasks`` (a name given twice is built once)."""
    from ..store.sources import check_task_name

    out: dict[str, TaskInfo] = {}
    if cfg.suite is not None and str(cfg.suite) not in SUITES:
        raise UsageError(f"--suite {cfg.suite!r}: choose one of {', '.join(SUITES)}")
    entries = [(None, n) for n in (SUITES[str(cfg.suite)] if cfg.suite is not None else ())]
    for item in cfg.tasks:
        stem, sep, spec = str(item).partition("=")
        if sep and not (stem and spec):
            raise UsageError(f"--tasks {item!r}: write NAME=TASK (e.g. cars=Cars or birds=birds.json)")
        entries.append((stem, spec) if sep else (None, item))
    if not entries:
        raise UsageError("no tasks: give --tasks (catalog names, JSON files of custom tasks) or --suite 8|14|20")
    for stem, spec in entries:
        is_file = spec.lower().endswith(".json") or "/" in spec or "\\" in spec
        try:
            task = load_task_file(spec) if is_file else get_task(spec)
        except TvqError as e:
            raise type(e)(f"--tasks: {e}") from None
        name = check_task_name(stem or task.name)
        other = out.get(name)
        if other is not None and other != task:
            raise UsageError(f"--tasks: two different tasks would be written to {name}.safetensors; "
                             f"name one with NAME=TASK")
        out[name] = task
    return out


# ------------------------------------------------------------------------------------------ model
def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(f"{p.name}:{_file_digest(p)}\n".encode())
    return h.hexdigest()


def _dir_files(d: Path) -> list[Path]:
    return [p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")]


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz"))


def model_identity(cfg: HeadsConfig) -> dict[str, str]:
    """What identifies the text tower (checked before anything is loaded): source, name, weights' sha256 or tag."""
    if cfg.source == "open_clip":
        if not cfg.model:
            raise UsageError("--model is required with --source open_clip (an open_clip name, e.g. ViT-B-32)")
        if not cfg.pretrained:
            raise UsageError("--pretrained is required with --source open_clip: a weights file or an open_clip tag "
                             "(random weights make meaningless heads)")
        ident = {"source": "open_clip", "model": cfg.model}
        if cfg.openclip_config:
            cpath = Path(cfg.openclip_config)
            if not cpath.exists():
                raise UsageError(f"--openclip-config {cpath}: no such file or directory; give a JSON model config")
            ident["config"] = _files_digest(_dir_files(cpath) if cpath.is_dir() else [cpath])
        weights = Path(cfg.pretrained)
        if weights.is_file():
            ident["weights"] = _file_digest(weights)
        elif weights.exists() or _looks_like_path(cfg.pretrained):
            raise UsageError(f"--pretrained {weights}: no such weights file; give an open_clip checkpoint or tag")
        else:
            ident["tag"] = cfg.pretrained
        return ident
    if cfg.source == "tiny_clip":
        from .tiny_clip import ASSET_DIR

        d = Path(cfg.pretrained) if cfg.pretrained else ASSET_DIR
        files = [d / "config.json", d / "weights.safetensors"]
        if not all(f.is_file() for f in files):
            raise UsageError(f"--pretrained {d}: not a tiny CLIP directory (config.json + weights.safetensors)")
        return {"source": "tiny_clip", "weights": _files_digest(files)}
    if cfg.source == "hf_clip":
        if not cfg.pretrained:
            raise UsageError("--pretrained is required with --source hf_clip: a Hugging Face CLIP folder (config.json, "
                             "weights, tokenizer files) or the name of a cached Hub model")
        from .hf_clip import resolve_model_dir

        try:
            root = resolve_model_dir(cfg.pretrained)
        except TvqError as e:
            raise UsageError(f"--pretrained: {e}") from None
        return {"source": "hf_clip", "weights": _files_digest(_dir_files(root))}
    raise UsageError(f"--source {cfg.source!r}: choose one of open_clip, tiny_clip, hf_clip")


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a device name torch knows; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: heads are built on cpu or cuda")
    return dev


def load_text_model(cfg: HeadsConfig) -> tuple[nn.Module, Callable[[list[str]], Tensor]]:
    """``(model with encode_text and logit_scale, tokenizer)`` of ``cfg``'s source, in eval mode on ``cfg.device``."""
    dev = _check_device(cfg.device)
    if cfg.source == "open_clip":
        from .encoders import _open_clip_config

        oc = _open_clip_config(cfg.openclip_config)
        if cfg.model not in oc.list_models():
            raise UsageError(f"--model {cfg.model!r}: open_clip has no such model; give a known name "
                             f"(open_clip.list_models()) or a local JSON config with --openclip-config")
        is_file = Path(cfg.pretrained).is_file()
        if not is_file and cfg.pretrained not in oc.list_pretrained_tags_by_model(cfg.model):
            tags = ", ".join(oc.list_pretrained_tags_by_model(cfg.model)) or "none"
            raise UsageError(f"--pretrained {cfg.pretrained!r}: neither a file nor an open_clip tag of {cfg.model} "
                             f"(tags: {tags})")
        try:
            model = oc.create_model(cfg.model, pretrained=cfg.pretrained, require_pretrained=True)
            tokenizer = oc.get_tokenizer(cfg.model)
        except RuntimeError as e:  # strict state-dict loading: wrong architecture
            if not is_file:
                raise TvqError(f"--pretrained {cfg.pretrained}: open_clip could not load this tag ({e!s:.200}); "
                               f"download the weights and give the file") from None
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TvqError(f"--pretrained {cfg.pretrained}: not weights of open_clip {cfg.model} ({first[:200]}); "
                           f"give the checkpoint of that model") from None
        model.visual = nn.Identity()  # only the text tower is needed: free the image tower's memory
    elif cfg.source == "tiny_clip":
        from .tiny_clip import load_tiny_clip

        model = load_tiny_clip(cfg.pretrained)
        tokenizer = model.tokenizer
    else:
        from .hf_clip import hf_clip_text

        model, tokenizer, _ = hf_clip_text(cfg.pretrained)
    return model.to(dev).eval(), tokenizer


# ------------------------------------------------------------------------------------------- heads
def head_fingerprint(identity: dict[str, str], task: TaskInfo) -> str:
    """sha256 over the model's identity, the class names and the templates."""
    blob = json.dumps([identity, list(task.classnames), list(task.templates)], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def read_head_metadata(path: str | Path) -> dict[str, str] | None:
    """The safetensors metadata of a head file, or None if the file is not a readable safetensors file."""
    from ..store.checkpoints import read_safetensors_header

    try:
        return read_safetensors_header(path)[1]
    except TvqError:  # unreadable, not safetensors: "not one of ours"
        return None


def _save_head(head: ClassificationHead, path: Path, metadata: dict[str, str]) -> None:
    """:meth:`ClassificationHead.save` with ``metadata`` (the fingerprint), naming ``path`` on I/O errors."""
    from ..store.io import output_errors

    with output_errors(path):
        head.save(path, metadata)


def _plan(cfg: HeadsConfig, tasks: dict[str, TaskInfo], identity: dict[str, str]) -> list[tuple[str, Path, str]]:
    """(name, path, status) per task, status ``reused``, ``built`` or ``rebuilt``; refuses before any work."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; heads are written into a directory: choose another --out")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"--out {out}: {parent} is a file, so the directory cannot be made; choose another --out")
    plan = []
    for name, task in tasks.items():
        path = out / f"{name}.safetensors"
        if not path.exists() and not path.is_symlink():
            plan.append((name, path, "built"))
            continue
        if not path.is_file():
            raise OutputExistsError(f"{path} exists and is not a file; move it away or choose another --out")
        meta = read_head_metadata(path)
        if cfg.overwrite:
            plan.append((name, path, "rebuilt"))
        elif meta is None or meta.get("format") != FORMAT:
            raise OutputExistsError(f"{path} exists and was not written by tvq heads; pass --overwrite to replace it "
                                    f"or choose another --out")
        elif meta.get("fingerprint") == head_fingerprint(identity, task):
            plan.append((name, path, "reused"))
        else:
            plan.append((name, path, "rebuilt"))
    return plan


def build_heads_detailed(cfg: HeadsConfig) -> list[HeadResult]:
    """:func:`build_heads`, reporting for each task whether its head was built, rebuilt or reused."""
    from tqdm.auto import tqdm

    if not cfg.out:
        raise UsageError("--out is required: the directory the heads are written to")
    tasks = resolve_tasks(cfg)
    identity = model_identity(cfg)
    _check_device(cfg.device)
    plan = _plan(cfg, tasks, identity)
    todo = [p for p in plan if p[2] != "reused"]
    model = tokenizer = None
    if todo:
        from ..store.io import output_errors

        model, tokenizer = load_text_model(cfg)
        for name, _, _ in todo:  # words the tokenizer cannot read fail here, before any head is written
            try:
                tokenizer([t.format(c) for c in tasks[name].classnames for t in tasks[name].templates])
            except TvqError as e:
                raise type(e)(f"task {name}: {e}") from None
        with output_errors(cfg.out):
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
    label = " ".join(f"{k}={v[:16] if k in ('weights', 'config') else v}" for k, v in identity.items())
    results = []
    for name, path, status in tqdm(plan, desc="zero-shot heads", unit="task", disable=cfg.quiet or not todo):
        task = tasks[name]
        if status != "reused":
            try:
                head = zeroshot_head(model, tokenizer, task.classnames, task.templates)
            except TvqError as e:
                raise type(e)(f"task {name}: {e}") from None
            _save_head(head, path, {"format": FORMAT, "fingerprint": head_fingerprint(identity, task),
                                    "task": task.name, "model": label, "num_classes": str(task.num_classes),
                                    "templates": str(len(task.templates))})
        results.append(HeadResult(task, path, status))
    return results


def build_heads(cfg: HeadsConfig) -> dict[str, Path]:
    """Build (or reuse) the zero-shot head of every task of ``cfg``; ``{file stem: head file}``.

    Heads are ``ClassificationHead.load``-able; see the module docstring for the caching rules.
    """
    return {r.path.stem: r.path for r in build_heads_detailed(cfg)}
