"""θ0 of the dense benchmark: an smp ``tu-resnet10t`` encoder, shipped as fp16 safetensors.

:func:`save_encoder` writes ``weights.safetensors`` (floating tensors as float16), its sha256 in
``weights.sha256`` and ``recipe.json`` (how it was trained); :func:`load_scene_encoder` checks the
sha256 and returns the float32 state dict, with smp's keys (``model.conv1.0.weight``, ...: the
state dict of ``segmentation_models_pytorch.encoders.get_encoder("tu-resnet10t")`` and of
:class:`~tvq_lightning.models.dense.DenseEncoder`), or a loaded ``DenseEncoder``.

Only torch, timm, numpy and safetensors are needed here (the pre-training machine has no smp):
:func:`timm_encoder` builds the same network with timm directly (its keys lack the ``model.`` prefix
that :data:`PREFIX` adds).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ...errors import TvqError

ENCODER = "tu-resnet10t"
PREFIX = "model."
ASSET = Path(__file__).resolve().parents[2] / "assets" / "scene_encoder"


def timm_encoder(name: str = ENCODER) -> torch.nn.Module:
    """The timm feature extractor smp's ``tu-<name>`` encoder wraps (5 stages, random weights)."""
    import timm

    return timm.create_model(name.removeprefix("tu-"), features_only=True, pretrained=False, out_indices=(0, 1, 2, 3, 4))


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_encoder(state: dict[str, torch.Tensor], out: str | Path, recipe: dict) -> Path:
    """Write ``state`` (smp keys) as fp16 safetensors + ``weights.sha256`` + ``recipe.json`` into ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).cpu().contiguous()
          for k, v in state.items()}
    save_file(sd, str(out / "weights.safetensors"), metadata={"encoder": ENCODER})
    digest = sha256(out / "weights.safetensors")
    (out / "weights.sha256").write_text(f"{digest}  weights.safetensors\n")
    (out / "recipe.json").write_text(json.dumps({**recipe, "encoder": ENCODER, "sha256": digest}, indent=2) + "\n")
    return out


def load_scene_encoder(path: str | Path | None = None, module: bool = False):
    """The shipped θ0 (or the one in folder ``path``): its float32 state dict, sha256-checked; with
    ``module=True`` a :class:`~tvq_lightning.models.dense.DenseEncoder` (needs smp) holding it."""
    folder = Path(path) if path is not None else ASSET
    weights = folder / "weights.safetensors"
    if not weights.is_file():
        raise TvqError(f"no scene encoder weights at {weights}; pre-train one with python -m "
                       "tvq_lightning.data.scenes.pretrain --out DIR")
    expected = (folder / "weights.sha256").read_text().split()[0] if (folder / "weights.sha256").is_file() else None
    if expected is None or sha256(weights) != expected:
        raise TvqError(f"{weights}: sha256 does not match {folder / 'weights.sha256'}; the weights are damaged or "
                       "were replaced without their checksum (copy the whole pre-training output folder)")
    from safetensors.torch import load_file

    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    if not module:
        return state
    from ...models.dense import DenseEncoder

    enc = DenseEncoder(ENCODER)
    enc.load_state_dict(state, strict=True)
    return enc
