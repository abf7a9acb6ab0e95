"""Image encoders by name: ``create_encoder(kind, **kwargs) -> nn.Module``.

Kinds (``list_encoders()``):

- ``open_clip``: the image tower (``model.visual``) of an open_clip model. ``model_name`` is any
  open_clip name, or the stem of a local JSON config given as ``config`` (registered with
  ``open_clip.add_model_config``). ``pretrained`` is an open_clip tag or a local file; ``None``
  (the default) builds random weights and downloads nothing. The text tower is built and
  dropped; zero-shot heads from text embeddings are not made here.
- ``timm``: ``timm.create_model(model_name, num_classes=0, pretrained=False)``: a feature
  extractor (no classifier).
- ``module``: any ``nn.Module``: an instance, or an importable ``class_path`` plus its kwargs.
- ``tiny``: :class:`tvq_lightning.models.TinyEncoder` (tests and tiny configs).
- ``hf_clip``: a Hugging Face transformers CLIP vision tower from a local folder (or the HF cache),
  with the transformers-5 ``CLIPVisionModel`` keys whatever version saved it
  (:mod:`tvq_lightning.models.hf_clip`).
- ``smp``: :class:`tvq_lightning.models.dense.DenseEncoder`, a segmentation_models_pytorch encoder
  (``name="resnet50"``, ``"tu-resnet10t"``, ...) returning multi-scale features for dense heads;
  ``weights=None`` (random), an smp tag (``"imagenet"``) or a local state-dict file.

Each kind is also a plain function with typed arguments and an ``nn.Module`` return annotation,
so a LightningCLI config can name it directly::

    model:
      encoder:
        class_path: tvq_lightning.models.encoders.open_clip_encoder
        init_args: {model_name: ViT-B-32, pretrained: /ckpt/openai.pt}
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import TvqError

_ENCODERS: dict[str, Callable[..., nn.Module]] = {}


def register_encoder(name: str):
    """Decorator: register a factory ``fn(**kwargs) -> nn.Module`` under ``name``."""
    def deco(fn):
        _ENCODERS[name] = fn
        return fn
    return deco


def _builtin_kinds() -> None:
    """Kinds defined in their own modules register on import (inside a function: no import cycle)."""
    from . import hf_clip  # noqa: F401  (transformers itself is imported only when one is built)


def list_encoders() -> list[str]:
    _builtin_kinds()
    return sorted(_ENCODERS)


def create_encoder(kind: str, **kwargs: Any) -> nn.Module:
    """Build an encoder of ``kind`` (see the module docstring) from its keyword arguments."""
    _builtin_kinds()
    try:
        fn = _ENCODERS[kind]
    except KeyError:
        raise TvqError(f"unknown encoder kind {kind!r}: choose one of {', '.join(list_encoders())}") from None
    return fn(**kwargs)


def _require(module: str, kind: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TvqError(f"encoder kind {kind!r} needs the {module} package; install tvq_lightning[zoo]") from None


def _open_clip_config(config: str | None):
    oc = _require("open_clip", "open_clip")
    if config is not None:
        path = Path(config)
        if not path.exists():
            raise TvqError(f"open_clip config {config} does not exist; give a JSON model config or a directory of them")
        oc.add_model_config(path)
    return oc


def _open_clip_model(model_name: str, pretrained: str | None, config: str | None, cache_dir: str | None):
    oc = _open_clip_config(config)
    if model_name not in oc.list_models():
        raise TvqError(f"open_clip has no model {model_name!r}; give a known name (open_clip.list_models()) "
                       f"or a local JSON config with config=PATH (its file stem is the name)")
    return oc.create_model_and_transforms(model_name, pretrained=pretrained, cache_dir=cache_dir)


@register_encoder("open_clip")
def open_clip_encoder(model_name: str, pretrained: str | None = None, config: str | None = None,
                      cache_dir: str | None = None) -> nn.Module:
    """The image tower of open_clip model ``model_name`` (features = image embeddings).

    Args:
        model_name: an open_clip model name, e.g. ``ViT-B-32``, or the stem of ``config``.
        pretrained: an open_clip pretrained tag or a local checkpoint file; None: random weights.
        config: a local JSON model config (or a directory of them) to register first.
        cache_dir: where open_clip looks for / stores downloaded weights.
    """
    model, _, _ = _open_clip_model(model_name, pretrained, config, cache_dir)
    return model.visual


def open_clip_transform(encoder: nn.Module | str, pretrained: str | None = None, config: str | None = None) -> Callable:
    """open_clip's validation preprocessing (used for adaptation and evaluation alike).

    ``encoder``: a tower returned by :func:`open_clip_encoder` (its ``preprocess_cfg`` already
    reflects the pretrained tag), or a model name, which builds the model to read it.
    """
    _require("open_clip", "open_clip")
    from open_clip.transform import PreprocessCfg, image_transform_v2

    if isinstance(encoder, str):
        encoder = open_clip_encoder(encoder, pretrained=pretrained, config=config)
    cfg = getattr(encoder, "preprocess_cfg", None)
    if cfg is None:
        raise TvqError(f"{type(encoder).__name__} has no open_clip preprocess_cfg; "
                       f"pass a tower made by open_clip_encoder")
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


@register_encoder("timm")
def timm_encoder(model_name: str, num_classes: int = 0, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model``: with ``num_classes=0`` the model returns pooled features."""
    timm = _require("timm", "timm")
    try:
        return timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise TvqError(f"timm has no model {model_name!r}; see timm.list_models()") from None
        raise


@register_encoder("module")
def module_encoder(class_path: str | nn.Module, **init_args: Any) -> nn.Module:
    """An ``nn.Module`` instance as is, or ``class_path`` (``package.module.Class``) built with ``init_args``."""
    if isinstance(class_path, nn.Module):
        if init_args:
            raise TvqError("module encoder: init_args are only used with a class_path string, not a module instance")
        return class_path
    mod_name, _, attr = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(mod_name), attr) if mod_name else None
    except (ImportError, AttributeError):
        cls = None
    if cls is None:
        raise TvqError(f"module encoder: cannot import {class_path!r}; give a full path like 'package.module.Class'")
    module = cls(**init_args)
    if not isinstance(module, nn.Module):
        raise TvqError(f"module encoder: {class_path} built a {type(module).__name__}, not an nn.Module")
    return module


@register_encoder("tiny")
def tiny_encoder(width: int = 64, depth: int = 2, heads: int = 4, patch: int = 8, image: int = 32,
                 out_dim: int = 32, seed: int | None = None) -> nn.Module:
    """:class:`~tvq_lightning.models.TinyEncoder`; with ``seed``, CLIP-like heavy-tailed weights.

    Without ``seed`` the output projection starts at zero (every feature is 0): give a seed for
    anything that fits a probe or trains.
    """
    from .tiny import TinyEncoder, tiny_pretrained

    kw = dict(width=width, depth=depth, heads=heads, patch=patch, image=image, out_dim=out_dim)
    return TinyEncoder(**kw) if seed is None else tiny_pretrained(seed, **kw)


@register_encoder("smp")
def smp_encoder(name: str = "resnet50", weights: str | bool | None = None, output_stride: int = 32,
                depth: int = 5, in_channels: int = 3) -> nn.Module:
    """:class:`~tvq_lightning.models.dense.DenseEncoder` (multi-scale features for dense heads).

    ``weights``: None (random, nothing downloaded), an smp weight tag (``"imagenet"``) read through
    the Hugging Face cache, or a local state-dict file with the encoder's keys.
    """
    from .dense import DenseEncoder

    return DenseEncoder(name=name, weights=weights, output_stride=output_stride, depth=depth, in_channels=in_channels)

