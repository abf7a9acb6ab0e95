"""A tiny CLIP for the embedded benchmark: a convolutional image tower and an open_clip text tower.

Same interface as an open_clip ``CLIP`` (``encode_image``, ``encode_text``, ``logit_scale``,
``visual``), so zero-shot heads (:mod:`.zeroshot`), fine-tuning and merging treat it exactly like
a real CLIP. The image tower is split in two:

- ``visual.stem``: four 3 x 3 conv blocks (GroupNorm + GELU; strides 1, 2, 2, 2), 32 x 32 -> 4 x 4;
- ``visual.top``: flatten -> ``fc`` (2048 -> 512) -> GELU -> ``ln`` -> a pre-norm residual MLP
  ``block`` (512 -> 1024 -> 512) -> ``ln_post`` -> ``proj`` (512 -> 256, no bias).

The embedded benchmark fine-tunes ``visual.top`` with the stem frozen, so the stem's features are
computed once per image. The text tower is :class:`open_clip.transformer.TextTransformer` over a
closed word vocabulary (:class:`WordTokenizer`): ``<pad>`` = 0, ``<sot>`` = 1, the words, then
``<eot>`` last, since open_clip pools the text at the token of highest id.

The shipped pre-trained weights (``tvq_lightning/assets/tiny_clip``) load with
:func:`load_tiny_clip`; ``configs/pretrain_tiny_clip.yaml`` is the recipe that made them.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import TvqError

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_clip"


class WordTokenizer:
    """Whitespace tokenizer over a closed vocabulary: ``texts -> LongTensor [N, context_length]``."""

    def __init__(self, vocab: Sequence[str], context_length: int = 20):
        self.vocab = list(vocab)
        self.index = {w: i + 2 for i, w in enumerate(self.vocab)}
        self.sot, self.pad = 1, 0
        self.eot = len(self.vocab) + 2
        self.vocab_size = len(self.vocab) + 3
        self.context_length = context_length

    def encode(self, text: str) -> list[int]:
        ids = []
        for w in text.lower().split():
            if w not in self.index:
                raise TvqError(f"the word {w!r} of {text!r} is not in this tokenizer's vocabulary "
                               f"({len(self.vocab)} words); use words the model was trained on")
            ids.append(self.index[w])
        return ids

    def __call__(self, texts: str | Sequence[str]) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.sot] + self.encode(text)[: self.context_length - 2] + [self.eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.GELU())


class ResidualMLP(nn.Module):
    """``x + fc2(gelu(fc1(ln(x))))`` (a transformer block's MLP half)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


class ImageTop(nn.Module):
    """The trainable top of the image tower: stem features ``[N, C, 4, 4]`` -> embeddings."""

    def __init__(self, in_features: int = 2048, width: int = 512, embed_dim: int = 256):
        super().__init__()
        self.fc = nn.Linear(in_features, width)
        self.ln = nn.LayerNorm(width)
        self.block = ResidualMLP(width, 2 * width)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln(F.gelu(self.fc(x.flatten(1))))
        return self.proj(self.ln_post(self.block(x)))


class ImageTower(nn.Module):
    def __init__(self, channels: Sequence[int] = (32, 64, 128, 128), width: int = 512, embed_dim: int = 256,
                 image_size: int = 32):
        super().__init__()
        strides = (1, 2, 2, 2)
        if len(channels) != len(strides):
            raise TvqError(f"the tiny CLIP stem has {len(strides)} conv blocks; give {len(strides)} channel counts")
        chans = (3, *channels)
        self.stem = nn.Sequential(*(ConvBlock(chans[i], chans[i + 1], s) for i, s in enumerate(strides)))
        side = image_size // 8
        self.top = ImageTop(channels[-1] * side * side, width, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.top(self.stem(x))


class TinyClip(nn.Module):
    """A CLIP with a convolutional image tower (see the module docstring).

    Args:
        vocab: the tokenizer's words (default: the embedded benchmark's vocabulary).
        channels, width, embed_dim: image tower sizes.
        text_width, text_heads, text_layers, context_length: text tower sizes.
    """

    def __init__(self, vocab: Sequence[str] | None = None, channels: Sequence[int] = (32, 64, 128, 128),
                 width: int = 512, embed_dim: int = 256, text_width: int = 128, text_heads: int = 4,
                 text_layers: int = 3, context_length: int = 20):
        super().__init__()
        from open_clip.transformer import TextTransformer

        if vocab is None:
            from ..data.embedded import vocabulary

            vocab = vocabulary()
        self.config = dict(vocab=list(vocab), channels=list(channels), width=width, embed_dim=embed_dim,
                           text_width=text_width, text_heads=text_heads, text_layers=text_layers,
                           context_length=context_length)
        self.tokenizer = WordTokenizer(vocab, context_length)
        self.visual = ImageTower(channels, width, embed_dim)
        self.text = TextTransformer(context_length=context_length, vocab_size=self.tokenizer.vocab_size,
                                    width=text_width, heads=text_heads, layers=text_layers, output_dim=embed_dim,
                                    pool_type="argmax")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        z = self.visual(images)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        z = self.text(tokens)
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.encode_image(images, True), self.encode_text(tokens, True), self.logit_scale.exp()


def save_tiny_clip(model: TinyClip, directory: str | Path, extra: dict | None = None) -> Path:
    """Write ``weights.safetensors`` (fp16, like the released CLIP weights) and ``config.json``
    (the architecture, the vocabulary, the weights' sha256 and ``extra``) atomically."""
    import hashlib

    from safetensors.torch import save

    from ..store.io import atomic_write_bytes, atomic_write_json

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    blob = save(sd)
    atomic_write_bytes(d / "weights.safetensors", blob)
    atomic_write_json(d / "config.json", {"model": model.config, "sha256": hashlib.sha256(blob).hexdigest(),
                                          **(extra or {})})
    return d


def load_tiny_clip(directory: str | Path | None = None) -> TinyClip:
    """The tiny CLIP saved in ``directory`` (default: the pre-trained one shipped in the package),
    in float32; the weights' sha256 is checked against ``config.json``."""
    import hashlib

    from safetensors.torch import load

    d = Path(directory) if directory is not None else ASSET_DIR
    cfg_path, w_path = d / "config.json", d / "weights.safetensors"
    if not cfg_path.exists() or not w_path.exists():
        raise TvqError(f"{d} holds no tiny CLIP (config.json + weights.safetensors); pre-train one with "
                       f"`tvq fit -c configs/pretrain_tiny_clip.yaml`")
    cfg = json.loads(cfg_path.read_text())
    blob = w_path.read_bytes()
    if cfg.get("sha256") and hashlib.sha256(blob).hexdigest() != cfg["sha256"]:
        raise TvqError(f"{w_path}: sha256 differs from {cfg_path}; the file is damaged or was replaced")
    model = TinyClip(**cfg["model"])
    model.load_state_dict({k: v.float() for k, v in load(blob).items()})
    return model.eval()
