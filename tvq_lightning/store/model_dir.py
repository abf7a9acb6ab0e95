"""Hugging Face model folders as checkpoints: ``open_model_dir(DIR) -> LazyStateDict``.

A model folder (what ``save_pretrained`` writes, or a Hub snapshot) holds ``config.json`` and the
weights in the first of these that exists:

``model.safetensors``
    one file, read zero-copy by :func:`~.checkpoints.open_checkpoint`'s safetensors reader;
``model.safetensors.index.json`` (+ its shards)
    a ``weight_map`` from each key to the shard file holding it. The index must name files inside
    the folder (no ``..``, no absolute paths), every shard must exist, and every key must sit in
    exactly one shard, the one the index names;
``pytorch_model.bin`` / ``pytorch_model.bin.index.json``
    ``torch.save`` files, read with ``weights_only=True`` (``allow_pickle`` as for single files).

Key layouts (``layout=``):

``"hf_clip_vision"``
    one canonical layout for every CLIP vision tower, the transformers-5 ``CLIPVisionModel`` keys
    (``embeddings.*``, ``pre_layrnorm.*``, ``encoder.layers.N.*``, ``post_layernorm.*``). A
    transformers-4 ``CLIPVisionModel`` folder (``vision_model.``-prefixed keys), a transformers-5
    one (no prefix), a ``CLIPVisionModelWithProjection`` and a full ``CLIPModel`` folder all give
    the same keys: ``vision_model.`` is stripped, and the text tower (``text_model.*``,
    ``text_projection.weight``), ``logit_scale`` and ``visual_projection.weight`` are left out.
    The projection is left out on purpose: fine-tuned ``CLIPVisionModel`` folders (FusionBench's)
    have none, so task vectors are over the vision tower's keys only; the projection is a frozen
    part of the zero-shot head (:mod:`tvq_lightning.models.hf_clip` reads it from theta_0's folder).
    The integer ``embeddings.position_ids`` buffer that old transformers versions saved is dropped
    too (current versions do not save it, and it is not a weight).
``"raw"``
    the keys as stored (then ``prefix`` selects and strips as in :func:`~.checkpoints.open_checkpoint`).
``"auto"`` (default)
    ``"raw"`` when a ``prefix`` is given (the caller chose the keys); else ``"hf_clip_vision"``
    when ``config.json`` names a CLIP model or CLIP vision model (or, without a config, the keys
    hold CLIP's ``pre_layrnorm``), and ``"raw"`` for any other model.

The result carries ``.layout`` (the layout used). Every failure is a one-line
:class:`~tvq_lightning.errors.CheckpointError` naming the folder or file and the fix.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from tvq_lightning.errors import CheckpointError
from tvq_lightning.store.checkpoints import (
    LazyStateDict,
    Shape,
    _DictSource,
    _extract_state_dict,
    _load_torch_object,
    _SafetensorsSource,
    _select,
)

__all__ = ["CLIP_VISION_ARCHITECTURES", "LAYOUTS", "WEIGHT_FILES", "find_weights", "hf_vision_keys",
           "open_model_dir", "read_config"]

#: weight files looked for, in order of preference
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
LAYOUTS = ("auto", "hf_clip_vision", "raw")
#: ``config.json`` architectures whose vision tower ``layout="hf_clip_vision"`` reads
CLIP_VISION_ARCHITECTURES = ("CLIPModel", "CLIPVisionModel", "CLIPVisionModelWithProjection")
_CLIP_MODEL_TYPES = ("clip", "clip_vision_model")
_VISION_PREFIX = "vision_model."
_VISION_TOP = ("embeddings", "pre_layrnorm", "encoder", "post_layernorm")
_NOT_VISION = ("visual_projection.weight", "text_projection.weight", "logit_scale")
_DROPPED = ("embeddings.position_ids",)


def read_config(root: str | os.PathLike) -> dict[str, Any] | None:
    """The folder's ``config.json`` as a dict, or ``None`` when it has none."""
    path = Path(root) / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({type(e).__name__}); re-download the model") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} is not a JSON object; re-download the model")
    return cfg


def _describe(cfg: dict[str, Any]) -> str:
    arch = cfg.get("architectures")
    name = ", ".join(map(str, arch)) if isinstance(arch, list) and arch else "model"
    return f"a {name} (model_type {cfg.get('model_type')!r})"


def _is_clip_config(cfg: dict[str, Any]) -> bool:
    arch = cfg.get("architectures")
    if isinstance(arch, list) and arch:
        return any(a in CLIP_VISION_ARCHITECTURES for a in arch)
    return cfg.get("model_type") in _CLIP_MODEL_TYPES


def find_weights(root: str | os.PathLike) -> Path:
    """The weights file of a model folder: the first of :data:`WEIGHT_FILES` that exists."""
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is a file, not a model folder; open it with open_checkpoint()" if root.exists() else "does not exist"
        raise CheckpointError(f"{root} {what}")
    for name in WEIGHT_FILES:
        if (root / name).is_file():
            return root / name
    others = sorted(p.name for p in root.iterdir() if p.suffix in (".h5", ".msgpack", ".safetensors", ".bin", ".pt"))
    hint = (f"; it has {', '.join(others[:3])}: open that file directly" if others
            else "; for a Hugging Face cache folder pass its snapshots/<revision> folder"
            if (root / "snapshots").is_dir() else "; download the model's weights into it")
    raise CheckpointError(f"{root} holds no weights: looked for {', '.join(WEIGHT_FILES)}{hint}")


def _shard_path(root: Path, index: Path, name: Any) -> Path:
    """``root/name`` for a shard name that stays inside ``root`` (checked on the name, so Hub
    snapshots, whose files are symbolic links into the cache, still work)."""
    bad = (not isinstance(name, str) or not name or "\\" in name or "\0" in name or os.path.isabs(name)
           or PurePosixPath(name).is_absolute() or re.match(r"^[A-Za-z]:", name) is not None
           or ".." in PurePosixPath(name).parts)
    if bad:
        raise CheckpointError(f"{index}: shard {name!r} is not a file inside {root} (absolute paths and '..' are "
                              f"refused); re-download the model")
    path = root / name
    if not path.is_file():
        raise CheckpointError(f"{index}: shard {name} is missing from {root}; download the model again")
    return path


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise CheckpointError(f"key {k!r} appears twice")
        seen[k] = v
    return seen


def _read_index(index: Path) -> dict[str, str]:
    """``weight_map`` of a shard index, validated: key -> shard name."""
    try:
        obj = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except CheckpointError as e:
        raise CheckpointError(f"{index}: {e}; each key must be listed once, in exactly one shard: "
                              f"re-download the model") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index} is not readable JSON ({type(e).__name__}); re-download the model") from None
    wmap = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise CheckpointError(f"{index} has no weight_map (a JSON object key -> shard file); re-download the model")
    return wmap


def _shards(root: Path, index: Path) -> tuple[dict[str, str], dict[str, Path]]:
    """``(weight_map, shard name -> path)`` with every shard name checked and every shard present."""
    wmap = _read_index(index)
    files: dict[str, Path] = {}
    for name in wmap.values():
        if name not in files:
            files[name] = _shard_path(root, index, name)
    return wmap, dict(sorted(files.items()))


def _check_owners(index: Path, wmap: dict[str, str], holdings: dict[str, Iterable[str]]) -> dict[str, str]:
    """Key -> shard from the shards' own key lists, which must agree with ``wmap`` exactly."""
    owner: dict[str, str] = {}
    for shard, keys in holdings.items():
        for k in keys:
            if k in owner:
                raise CheckpointError(f"{index}: key {k!r} is in both {owner[k]} and {shard}; the shards overlap: "
                                      f"re-download the model")
            if wmap.get(k) != shard:
                where = f"the index puts it in {wmap[k]}" if k in wmap else "the index does not list it"
                raise CheckpointError(f"{index}: shard {shard} holds key {k!r} but {where}; re-download the model")
            owner[k] = shard
    for k, shard in wmap.items():
        if k not in owner:
            raise CheckpointError(f"{index}: key {k!r} is listed in shard {shard}, which does not hold it; "
                                  f"re-download the model")
    return owner


class _ShardedSafetensorsSource:
    """Several safetensors shards behind the one-file source interface (``meta/get/release``)."""

    def __init__(self, root: Path, index: Path) -> None:
        wmap, files = _shards(root, index)
        self.parts = {name: _SafetensorsSource(path) for name, path in files.items()}
        #: key -> shard name, in shard order then file order
        self.entries = _check_owners(index, wmap, {n: s.entries for n, s in self.parts.items()})
        first = next(iter(self.parts.values()))
        self.metadata: dict[str, str] = dict(first.metadata)

    def meta(self, key: str) -> tuple[Shape, torch.dtype]:
        return self.parts[self.entries[key]].meta(key)

    def get(self, key: str) -> torch.Tensor:
        return self.parts[self.entries[key]].get(key)

    def release(self, key: str | None = None) -> None:
        if key is None:
            for part in self.parts.values():
                part.release()
        else:
            self.parts[self.entries[key]].release(key)


def _torch_state_dict(path: Path, allow_pickle: bool, trust_pickle_code: bool) -> dict[str, torch.Tensor]:
    """One ``torch.save`` file's tensors, with :func:`~.checkpoints.open_checkpoint`'s pickle rules."""
    obj = (_load_torch_object(path, allow_pickle, trust_pickle_code) if trust_pickle_code
           else _load_torch_object(path, allow_pickle))
    return _extract_state_dict(obj, path)


def _sharded_torch_source(root: Path, index: Path, allow_pickle: bool, trust_pickle_code: bool) -> _DictSource:
    wmap, files = _shards(root, index)
    loaded = {name: _torch_state_dict(path, allow_pickle, trust_pickle_code) for name, path in files.items()}
    owner = _check_owners(index, wmap, loaded)
    return _DictSource({k: loaded[shard][k] for k, shard in owner.items()})


def hf_vision_keys(keys: Iterable[str], *, source: str = "these weights") -> dict[str, str]:
    """Canonical CLIP vision key -> given key (see the module docstring, ``"hf_clip_vision"``).

    Accepts transformers-4 (``vision_model.``-prefixed) and transformers-5 (unprefixed) vision
    keys and full ``CLIPModel`` keys; ``source`` names the weights in error messages.
    """
    keys = list(keys)
    out: dict[str, str] = {}
    for k in keys:
        if k in _NOT_VISION or k.startswith("text_model."):
            continue
        c = k[len(_VISION_PREFIX):] if k.startswith(_VISION_PREFIX) else k
        if c in _DROPPED:
            continue
        if c.split(".", 1)[0] not in _VISION_TOP:
            raise CheckpointError(f"{source}: key {k!r} is not part of a CLIP vision tower (expected "
                                  f"[vision_model.]{{{','.join(_VISION_TOP)}}}.*); open it with layout='raw'")
        if c in out:
            raise CheckpointError(f"{source} holds {c!r} both with and without the 'vision_model.' prefix; "
                                  f"keep one copy (re-save the model)")
        out[c] = k
    if not out:
        shown = ", ".join(repr(k) for k in keys[:3]) or "none"
        raise CheckpointError(f"{source} holds no CLIP vision weights (keys: {shown}); pass a CLIPModel or "
                              f"CLIPVisionModel folder, or layout='raw'")
    return out


def _looks_clip(cfg: dict[str, Any] | None, keys: list[str]) -> bool:
    if cfg is not None:
        return _is_clip_config(cfg)
    return any(k in ("pre_layrnorm.weight", _VISION_PREFIX + "pre_layrnorm.weight") for k in keys)


def open_model_dir(path: str | os.PathLike, *, prefix: str | None = None, allow_pickle: bool = False,
                   trust_pickle_code: bool = False, layout: str = "auto") -> LazyStateDict:
    """Open a Hugging Face model folder lazily (formats and layouts: see the module docstring).

    ``prefix`` selects and strips keys of the stored (raw) names before ``layout`` applies;
    ``allow_pickle`` / ``trust_pickle_code`` apply to ``pytorch_model*.bin`` files exactly as in
    :func:`~.checkpoints.open_checkpoint`.
    """
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r} for {path}; choose one of {', '.join(LAYOUTS)}")
    root = Path(path).expanduser()
    weights = find_weights(root)
    cfg = read_config(root)
    if weights.name.endswith(".index.json"):
        if weights.name.startswith("model."):
            source, fmt = _ShardedSafetensorsSource(root, weights), "safetensors"
        else:
            source, fmt = _sharded_torch_source(root, weights, allow_pickle, trust_pickle_code), "torch"
    elif weights.suffix == ".safetensors":
        source, fmt = _SafetensorsSource(weights), "safetensors"
    else:
        source, fmt = _DictSource(_torch_state_dict(weights, allow_pickle, trust_pickle_code)), "torch"
    key_map = _select(weights, source.entries, prefix)
    if layout == "auto":
        layout = "raw" if prefix else "hf_clip_vision" if _looks_clip(cfg, list(key_map)) else "raw"
    if layout == "hf_clip_vision":
        if cfg is not None and not _is_clip_config(cfg):
            raise CheckpointError(f"{root / 'config.json'} describes {_describe(cfg)}, not a CLIP model; "
                                  f"layout='hf_clip_vision' reads {', '.join(CLIP_VISION_ARCHITECTURES)} folders: "
                                  f"pass layout='raw' to read its keys as stored")
        key_map = {c: key_map[k] for c, k in hf_vision_keys(key_map, source=str(weights)).items()}
    sd = LazyStateDict(root, source, key_map, fmt)
    sd.layout = layout  # type: ignore[attr-defined]
    return sd
