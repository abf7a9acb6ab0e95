"""Hugging Face transformers CLIP as an encoder source (FusionBench's CLIP fine-tunes and theta_0).

- :func:`hf_clip_encoder` (encoder kind ``hf_clip``): the image tower of a CLIP model folder (or a
  Hub name already in the local cache) as :class:`HFClipVisionEncoder`. Its ``state_dict()`` keys
  are the canonical CLIP vision keys of :func:`tvq_lightning.store.model_dir.open_model_dir`
  (``layout="hf_clip_vision"``: the transformers-5 ``CLIPVisionModel`` keys), so stores and merged
  weights built from any CLIP folder (transformers 4 or 5, vision-only or full) load into it with
  ``load_state_dict(..., strict=True)``. ``forward(images)`` returns the image embeddings: the
  pooled output (post-layernormed class token) through ``visual_projection`` when the folder has
  ``visual_projection.weight`` (a ``CLIPModel`` or ``CLIPVisionModelWithProjection``: the same
  numbers as ``CLIPVisionModelWithProjection(...).image_embeds``), else the pooled output itself
  (``CLIPVisionModel(...).pooler_output``). The projection is a frozen buffer outside the state
  dict: it is never merged nor trained, as in FusionBench, where it belongs to the zero-shot head.
- :func:`hf_clip_text`: the text tower of a full ``CLIPModel`` folder as :class:`HFClipText`
  (``encode_text``, ``logit_scale``) with a :class:`HFClipTokenizer` (``list[str] -> LongTensor``
  padded to the text context length), ready for :func:`tvq_lightning.models.zeroshot.zeroshot_head`.
- :func:`hf_clip_transform`: the evaluation preprocessing of ``CLIPImageProcessor`` (resize the
  shortest side, centre crop, rescale, normalise) as a torchvision transform on PIL images.

Everything is offline by default (``local_files_only=True``): a name that is neither a folder nor
in the Hugging Face cache is a one-line :class:`~tvq_lightning.errors.TvqError` saying how to get it.
The weights are read by :func:`~tvq_lightning.store.model_dir.open_model_dir`, not by transformers'
loader, so the key layout of the transformers version that saved them does not matter.
"""
from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..errors import TvqError
from ..store.model_dir import WEIGHT_FILES, open_model_dir, read_config
from .encoders import register_encoder

__all__ = ["HFClipText", "HFClipTokenizer", "HFClipVisionEncoder", "hf_clip_encoder", "hf_clip_text",
           "hf_clip_transform", "resolve_model_dir"]

#: files fetched when downloads are allowed (no TensorFlow / Flax weights)
_HUB_FILES = ["*.json", "*.txt", "*.safetensors"]
_HUB_TORCH_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def _transformers():
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise TvqError("Hugging Face CLIP models need the transformers package; install tvq_lightning[hf]") from None


def _has_weights(d: Path) -> bool:
    return any((d / n).is_file() for n in WEIGHT_FILES)


def resolve_model_dir(model_name_or_path: str | os.PathLike, *, local_files_only: bool = True,
                      cache_dir: str | None = None) -> Path:
    """A local model folder, or the cached snapshot of Hub model ``model_name_or_path``.

    With ``local_files_only=False`` (and ``HF_HUB_OFFLINE`` unset) a missing model is downloaded
    (json, txt and safetensors files; ``pytorch_model*.bin`` only when there is no safetensors).
    """
    name = str(model_name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise TvqError(f"{path} is a file; pass the model folder that holds config.json and the weights")
    if not _REPO_ID.match(name) or ".." in name:
        raise TvqError(f"{name}: no such folder; pass a model folder (config.json and weights) or a Hugging Face "
                       f"model name such as openai/clip-vit-base-patch32")
    from huggingface_hub import snapshot_download

    where = f" ({cache_dir})" if cache_dir else ""
    try:
        snap = Path(snapshot_download(name, cache_dir=cache_dir, local_files_only=local_files_only,
                                      allow_patterns=_HUB_FILES))
        if not local_files_only and not _has_weights(snap):
            snap = Path(snapshot_download(name, cache_dir=cache_dir, allow_patterns=_HUB_FILES + _HUB_TORCH_FILES))
    except Exception as e:  # not cached, offline, unknown repo, invalid name, network errors
        how = ("let it download with local_files_only=False and HF_HUB_OFFLINE=0" if local_files_only
               else f"the download failed ({type(e).__name__})")
        raise TvqError(f"model {name!r} is neither a local folder nor in the Hugging Face cache{where}; download it "
                       f"with `hf download {name} --local-dir DIR` (older huggingface_hub: huggingface-cli download) "
                       f"and pass DIR, or {how}") from None
    return snap


def _vision_config(root: Path):
    tf = _transformers()
    cfg = read_config(root)
    if cfg is None:
        raise TvqError(f"{root} has no config.json; pass a folder written by save_pretrained (a CLIP model)")
    if cfg.get("model_type") == "clip":
        return tf.CLIPConfig.from_pretrained(str(root), local_files_only=True).vision_config
    if cfg.get("model_type") == "clip_vision_model":
        return tf.CLIPVisionConfig.from_pretrained(str(root), local_files_only=True)
    raise TvqError(f"{root / 'config.json'} has model_type {cfg.get('model_type')!r}; the hf_clip encoder needs "
                   f"a CLIP model ('clip' or 'clip_vision_model')")


def _load_strict(module: nn.Module, state: dict[str, Tensor], root: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise TvqError(f"{root}: the weights do not fit its config.json ({first.rstrip('.')}); "
                       f"the folder is inconsistent: re-download or re-save the model") from None


class HFClipVisionEncoder(nn.Module):
    """A transformers CLIP vision tower whose parameter names are the canonical CLIP vision keys.

    Holds the tower's ``embeddings``, ``pre_layrnorm``, ``encoder`` and ``post_layernorm`` as its
    own children (so ``state_dict()`` and ``named_parameters()`` carry no prefix), and the
    optional projection as the non-persistent buffer ``projection`` ``[embed_dim, hidden]``.
    """

    def __init__(self, tower: nn.Module, projection: Tensor | None = None, source: str = "") -> None:
        super().__init__()
        self.embeddings = tower.embeddings
        self.pre_layrnorm = tower.pre_layrnorm
        self.encoder = tower.encoder
        self.post_layernorm = tower.post_layernorm
        self.source = source
        self.register_buffer("projection", None if projection is None else projection.detach().clone(),
                             persistent=False)

    @property
    def output_dim(self) -> int:
        """Width of the returned embeddings."""
        p = self.projection
        return int(p.shape[0]) if p is not None else int(self.post_layernorm.normalized_shape[0])

    def pooled(self, images: Tensor) -> Tensor:
        """The post-layernormed class token (``CLIPVisionModel(...).pooler_output``)."""
        hidden = self.pre_layrnorm(self.embeddings(images))
        hidden = self.encoder(inputs_embeds=hidden)[0]  # a BaseModelOutput in transformers 4 and 5
        return self.post_layernorm(hidden[:, 0, :])

    def forward(self, images: Tensor) -> Tensor:
        pooled = self.pooled(images)
        return pooled if self.projection is None else pooled @ self.projection.to(pooled.dtype).T


@register_encoder("hf_clip")
def hf_clip_encoder(model_name_or_path: str, local_files_only: bool = True, cache_dir: str | None = None,
                    with_projection: bool | None = None) -> nn.Module:
    """The image tower of a Hugging Face CLIP model (see the module docstring).

    Args:
        model_name_or_path: a model folder (``CLIPModel``, ``CLIPVisionModel`` or
            ``CLIPVisionModelWithProjection``, saved by transformers 4 or 5), or a Hub name such as
            ``openai/clip-vit-base-patch32`` found in the Hugging Face cache.
        local_files_only: never download (the default); False downloads a missing Hub model.
        cache_dir: the Hugging Face cache to look in (default: the standard one).
        with_projection: None: project when the folder has ``visual_projection.weight``; True:
            require it; False: return the pooled output even when it is there.
    """
    root = resolve_model_dir(model_name_or_path, local_files_only=local_files_only, cache_dir=cache_dir)
    config = _vision_config(root)
    tf = _transformers()
    model = tf.CLIPVisionModel(config)
    tower = getattr(model, "vision_model", model)  # transformers 4 nests the tower, 5 does not
    encoder = HFClipVisionEncoder(tower, None, str(root))
    with open_model_dir(root, layout="hf_clip_vision") as sd:
        _load_strict(encoder, {k: sd[k] for k in sd}, root)
    projection = None
    if with_projection is not False:
        with open_model_dir(root, layout="raw") as raw:
            if "visual_projection.weight" in raw:
                projection = raw["visual_projection.weight"].float().clone()
        if projection is None and with_projection:
            raise TvqError(f"{root} has no visual_projection.weight (a CLIPVisionModel folder); pass theta_0's "
                           f"CLIPModel folder, or with_projection=False for the pooled output")
        if projection is not None and projection.shape[1] != config.hidden_size:
            raise TvqError(f"{root}: visual_projection.weight is {tuple(projection.shape)}, but the vision width is "
                           f"{config.hidden_size}; the folder is inconsistent: re-download it")
    if projection is not None:
        encoder.projection = projection
    return encoder.eval()


class HFClipTokenizer:
    """``texts -> LongTensor [N, context_length]``: a transformers CLIP tokenizer, padded and truncated."""

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = int(context_length)
        if tokenizer.pad_token is None:  # CLIP pads with its end-of-text token
            tokenizer.pad_token = tokenizer.eos_token

    def __call__(self, texts: str | Sequence[str]) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = self.tokenizer(texts, padding="max_length", max_length=self.context_length, truncation=True,
                             return_tensors="pt")
        return out["input_ids"].long()


class HFClipText(nn.Module):
    """CLIP's text tower with projection, in the interface of :func:`~.zeroshot.zeroshot_head`.

    No attention mask is needed: CLIP's text transformer is causal and pools at the end-of-text
    token, so the padding after it changes nothing.
    """

    def __init__(self, text_model: nn.Module, logit_scale: Tensor) -> None:
        super().__init__()
        self.text = text_model  #: a transformers ``CLIPTextModelWithProjection``
        self.logit_scale = nn.Parameter(logit_scale.detach().float().reshape(()).clone(), requires_grad=False)

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        emb = self.text(input_ids=tokens).text_embeds
        return nn.functional.normalize(emb, dim=-1) if normalize else emb


def hf_clip_text(model_name_or_path: str, local_files_only: bool = True,
                 cache_dir: str | None = None) -> tuple[HFClipText, HFClipTokenizer, Tensor]:
    """``(text adapter, tokenizer, logit_scale)`` of a full ``CLIPModel`` folder or cached Hub name.

    ``logit_scale`` is the stored log temperature (``zeroshot_head`` multiplies rows by its exp).
    """
    root = resolve_model_dir(model_name_or_path, local_files_only=local_files_only, cache_dir=cache_dir)
    tf = _transformers()
    cfg = read_config(root)
    if cfg is None or cfg.get("model_type") != "clip":
        kind = "no config.json" if cfg is None else f"model_type {cfg.get('model_type')!r}"
        raise TvqError(f"{root} has {kind}, not a full CLIP model with a text tower; pass theta_0's CLIPModel "
                       f"folder (e.g. openai/clip-vit-base-patch32)")
    config = tf.CLIPConfig.from_pretrained(str(root), local_files_only=True)
    with open_model_dir(root, layout="raw") as raw:
        need = ("text_projection.weight", "logit_scale")
        if not all(k in raw for k in need):
            miss = next(k for k in need if k not in raw)
            raise TvqError(f"{root}: the weights lack {miss!r}; pass a full CLIPModel folder (text tower included)")
        state = {k: raw[k] for k in raw if (k.startswith("text_model.") or k == "text_projection.weight")
                 and not k.endswith("embeddings.position_ids")}
        logit_scale = raw["logit_scale"].float().clone()
    text = tf.CLIPTextModelWithProjection(config.text_config)
    _load_strict(text, state, root)
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise TvqError(f"{root}: no usable tokenizer ({type(e).__name__}); the folder needs tokenizer.json or "
                       f"vocab.json + merges.txt (download the full model)") from None
    adapter = HFClipText(text.eval(), logit_scale)
    return adapter, HFClipTokenizer(tok, config.text_config.max_position_embeddings), adapter.logit_scale.detach()


class _ConvertRGB:
    def __call__(self, img: Any) -> Any:
        return img.convert("RGB") if getattr(img, "mode", "RGB") != "RGB" else img

    def __repr__(self) -> str:
        return "ConvertRGB()"


class _CenterCropFloor:
    """Centre crop with the top-left corner rounded down, as ``CLIPImageProcessor`` does."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width

    def __call__(self, img: Any) -> Any:
        import torchvision.transforms.functional as TF

        w, h = img.size
        if w < self.width or h < self.height:
            return TF.center_crop(img, [self.height, self.width])  # pads, as the processor does
        return TF.crop(img, (h - self.height) // 2, (w - self.width) // 2, self.height, self.width)

    def __repr__(self) -> str:
        return f"CenterCropFloor({self.height}, {self.width})"


class _Scale:
    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, t: Tensor) -> Tensor:
        return t.float() * self.factor

    def __repr__(self) -> str:
        return f"Scale({self.factor})"


def _hw(size: Any, what: str, path: Path) -> tuple[int, int] | int:
    """``(height, width)``, or an int for a shortest-edge size."""
    if isinstance(size, int):
        return size
    if isinstance(size, dict) and "shortest_edge" in size:
        return int(size["shortest_edge"])
    if isinstance(size, dict) and {"height", "width"} <= size.keys():
        return int(size["height"]), int(size["width"])
    raise TvqError(f"{path}: {what} {size!r} is not understood; use {{'shortest_edge': N}} or {{'height', 'width'}}")


def hf_clip_transform(model_name_or_path: str, local_files_only: bool = True, cache_dir: str | None = None) -> Callable:
    """``CLIPImageProcessor``'s evaluation preprocessing as a torchvision transform on PIL images.

    Reads ``preprocessor_config.json`` (sizes, ``resample``, ``image_mean``/``image_std``, the
    ``do_*`` switches); a folder without one (FusionBench's vision-only fine-tunes) gets the
    processor's defaults at the config's ``image_size``: bicubic resize of the shortest side,
    centre crop, OpenAI CLIP mean and std. The result equals the processor's PIL backend (the
    transformers-4 default); transformers 5's torchvision backend resizes tensors and differs by
    at most one 8-bit step on some pixels.
    """
    import json

    from torchvision import transforms as T

    root = resolve_model_dir(model_name_or_path, local_files_only=local_files_only, cache_dir=cache_dir)
    path = root / "preprocessor_config.json"
    if path.is_file():
        try:
            pp = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TvqError(f"{path} is not readable JSON ({type(e).__name__}); re-download the model") from None
    else:
        image = _vision_config(root).image_size
        pp = {"size": {"shortest_edge": image}, "crop_size": {"height": image, "width": image}}
    mean = pp.get("image_mean", [0.48145466, 0.4578275, 0.40821073])  # CLIPImageProcessor's defaults (OpenAI CLIP)
    std = pp.get("image_std", [0.26862954, 0.26130258, 0.27577711])
    modes = {0: T.InterpolationMode.NEAREST, 1: T.InterpolationMode.LANCZOS, 2: T.InterpolationMode.BILINEAR,
             3: T.InterpolationMode.BICUBIC, 4: T.InterpolationMode.BOX, 5: T.InterpolationMode.HAMMING}
    steps: list[Callable] = []
    if pp.get("do_convert_rgb", True):
        steps.append(_ConvertRGB())
    if pp.get("do_resize", True):
        size = _hw(pp.get("size", {"shortest_edge": 224}), "size", path)
        steps.append(T.Resize(size if isinstance(size, int) else list(size),
                              interpolation=modes.get(pp.get("resample", 3), T.InterpolationMode.BICUBIC)))
    if pp.get("do_center_crop", True):
        crop = _hw(pp.get("crop_size", pp.get("size", 224)), "crop_size", path)
        steps.append(_CenterCropFloor(*((crop, crop) if isinstance(crop, int) else crop)))
    steps.append(T.PILToTensor())
    steps.append(_Scale(float(pp.get("rescale_factor", 1 / 255)) if pp.get("do_rescale", True) else 1.0))
    if pp.get("do_normalize", True):
        steps.append(T.Normalize(mean, std))
    return T.Compose(steps)
