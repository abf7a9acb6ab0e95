"""Import the classification heads of the task_vectors and tall_masks releases as tvq heads.

task_vectors ships ``head_<Dataset>.pt`` as a pickled ``src.modeling.ClassificationHead`` (an
``nn.Linear`` with a bool attribute ``normalize``), tall_masks as ``src.models.heads.ClassificationHead``.
:func:`import_head` reads such a file through :mod:`.safe_pickle` (no code from the file runs,
the project's repository is not needed) and keeps ``normalize``; a state dict file (safetensors or
``torch.save``) with ``weight`` and optionally ``bias`` works too. :func:`import_heads` writes
``<out_dir>/<task>.safetensors`` for the evaluation modules' ``heads_dir``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError, OutputError, OutputExistsError
from ..models.heads import ClassificationHead
from .checkpoints import SAFETENSORS_EXTENSIONS, _check_file, _extract_state_dict, _load_torch_object, _select, load_state_dict
from .io import output_errors
from .safe_pickle import is_module, stand_in_class
from .sources import check_task_name

__all__ = ["import_head", "import_heads"]

_HEAD_KEYS = ("weight", "bias")


def _read(path: Path, prefix: str | None, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], bool | None]:
    """The head's tensors (prefix stripped) and its pickled ``normalize`` (None when the file has none)."""
    if path.suffix.lower() in SAFETENSORS_EXTENSIONS:
        return load_state_dict(path, prefix=prefix), None
    obj = _load_torch_object(path, allow_pickle)
    normalize = obj.__dict__["_tvq_state"].get("normalize") if is_module(obj) else None
    if normalize is not None and not isinstance(normalize, bool):
        raise CheckpointError(f"{path}: the pickled {stand_in_class(obj)} has normalize={normalize!r}, not a bool; "
                              f"re-export the head")
    sd = _extract_state_dict(obj, path)
    return {k: sd[src] for k, src in _select(path, sd, prefix).items()}, normalize


def import_head(path: str | os.PathLike, *, prefix: str | None = None, allow_pickle: bool = True) -> ClassificationHead:
    """A :class:`~tvq_lightning.models.heads.ClassificationHead` from a released head file.

    Args:
        path: a pickled task_vectors / tall_masks head, or a state dict with ``weight`` (and ``bias``).
        prefix: keep only keys under this prefix and strip it (a head nested in a larger checkpoint).
        allow_pickle: read pickled heads through the allow-list of :mod:`.safe_pickle` (no code runs);
            False refuses them like any pickled checkpoint.

    The pickled ``normalize`` attribute is kept (default True where the file has none).
    """
    p = _check_file(path)
    sd, normalize = _read(p, prefix, allow_pickle)
    extra = [k for k in sd if k not in _HEAD_KEYS]
    if extra:
        raise CheckpointError(f"{p} is not a classification head: besides weight/bias it holds {len(extra)} tensors "
                              f"(e.g. {extra[0]!r}); pass a head file, or a prefix that selects one head")
    weight, bias = sd.get("weight"), sd.get("bias")
    if weight is None or weight.dim() != 2 or not weight.is_floating_point():
        got = "no 'weight'" if weight is None else f"a {weight.dtype} 'weight' of shape {tuple(weight.shape)}"
        raise CheckpointError(f"{p} holds {got}; a head needs a 2-D floating 'weight' (classes x features)")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or not bias.is_floating_point()):
        raise CheckpointError(f"{p}: 'bias' has shape {tuple(bias.shape)} but 'weight' has {weight.shape[0]} rows; "
                              f"re-export the head")
    return ClassificationHead(weight, bias, normalize=True if normalize is None else normalize)


def import_heads(paths: Mapping[str, str | os.PathLike], out_dir: str | os.PathLike, *, overwrite: bool = False,
                 allow_pickle: bool = True) -> dict[str, Path]:
    """Import one head per task and write them as ``<out_dir>/<task>.safetensors``.

    Every head is read and checked before anything is written; each file is written atomically
    (:meth:`ClassificationHead.save`). Returns ``{task: path written}``. An existing head file is
    replaced only with ``overwrite``. ``normalize`` is recorded in each file's metadata.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file; the heads need a directory: choose another output directory")
    heads = {check_task_name(task): import_head(path, allow_pickle=allow_pickle) for task, path in paths.items()}
    targets = {task: out / f"{task}.safetensors" for task in heads}
    existing = [t for t in targets.values() if t.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{existing[0]} already exists; choose another directory or pass overwrite=True")
    with output_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        for task, head in heads.items():
            head.save(targets[task])
    return targets
