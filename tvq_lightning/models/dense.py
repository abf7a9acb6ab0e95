"""Dense prediction models: a shared multi-scale encoder and one decoder per task (docs/dense.md).

- :class:`DenseEncoder`: an encoder of segmentation_models_pytorch (smp), ``resnet50``,
  ``resnet18``, ... or any timm model as ``tu-<name>`` (``tu-resnet10t``). ``forward(x)`` returns
  smp's list of multi-scale features ``[x, f1/2, f1/4, f1/8, f1/16, f1/32]`` (with a dilated
  encoder, ``output_stride`` 8 or 16, the deepest maps keep that stride). Its state dict is
  exactly the smp encoder's (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...: torchvision's
  ResNet keys for smp ResNets), and these keys are what forms task vectors: only the encoder is
  merged.
- :class:`DenseHead`: one task's decoder (an smp ``unet``, ``fpn``, ``deeplabv3`` or
  ``deeplabv3plus`` decoder plus a final convolution to ``out_channels``), upsampled to the input
  size. Saved per task beside the store (:meth:`DenseHead.save`, safetensors with its
  constructor config as JSON metadata), never merged.
- :func:`paper_nyuv2` / :data:`PAPER_NYUV2`: the papers' setting (FusionBench's NYUv2 model pool):
  a ResNet-50 dilated to output stride 8 with a DeepLab ASPP head per task, 288 x 384 inputs.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import TvqError

DECODERS = ("unet", "fpn", "deeplabv3", "deeplabv3plus")
_DEFAULT_CHANNELS: dict[str, Any] = {"unet": (256, 128, 64, 32, 16), "fpn": (256, 128),
                                     "deeplabv3": 256, "deeplabv3plus": 256}
HEAD_FORMAT = "tvq_lightning.DenseHead"
_WEIGHT_FILES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")

#: The papers' dense setting (FusionBench NYUv2): encoder and head keyword arguments, input size.
PAPER_NYUV2 = {"encoder": {"name": "resnet50", "output_stride": 8},
               "head": {"decoder": "deeplabv3", "decoder_channels": 256, "atrous_rates": (12, 24, 36)},
               "image_size": (288, 384), "out_channels": {"segmentation": 13, "depth": 1, "normal": 3}}


def _smp():
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        raise TvqError("dense models need segmentation-models-pytorch; pip install segmentation-models-pytorch") from None
    return smp


def _missing_weights(name: str, weights: Any, exc: BaseException) -> TvqError:
    if name.startswith("tu-"):
        where = f"timm's pretrained weights for {name[3:]!r} (Hugging Face hub, timm/{name[3:].split('.')[0]})"
    else:
        where = f"smp's {weights!r} weights for {name!r} (Hugging Face hub, smp-hub/{name}.{weights})"
    return TvqError(f"cannot get {where} offline ({type(exc).__name__}): download them once with network access "
                    f"(HF_HUB_OFFLINE unset) into the Hugging Face cache, or pass weights=/path/to/encoder.safetensors")


class DenseEncoder(nn.Module):
    """A shared smp encoder: ``forward(x) -> list[Tensor]`` of multi-scale features.

    Args:
        name: an smp encoder name (``resnet50``, ``resnet18``, ``mobilenet_v2``, ...) or ``tu-<timm name>``.
        weights: None (random, downloads nothing); an smp weight tag (``"imagenet"``; ``True`` for
            ``tu-`` encoders) fetched through the Hugging Face cache; or a local state-dict file
            (``.safetensors`` / ``.pt``) with the encoder's own keys.
        output_stride: 32 (plain), 16 or 8 (dilated deepest stages, as DeepLab).
        depth: number of stages (3..5).
        in_channels: input channels.

    The encoder's modules are this module's children, so ``state_dict()`` has exactly the smp
    encoder's keys (no prefix).
    """

    def __init__(self, name: str = "resnet50", weights: str | bool | None = None, output_stride: int = 32,
                 depth: int = 5, in_channels: int = 3):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise TvqError(f"DenseEncoder output_stride must be 8, 16 or 32, got {output_stride}")
        smp = _smp()
        if isinstance(weights, str) and weights.strip().lower() in ("", "none", "null"):
            weights = None        # a config's null can arrive as text
        local = isinstance(weights, (str, Path)) and (
            Path(weights).exists() or "/" in str(weights) or str(weights).endswith(_WEIGHT_FILES))
        tag = None if local else weights
        try:
            inner = smp.encoders.get_encoder(name, in_channels=in_channels, depth=depth, weights=tag,
                                             output_stride=output_stride)
        except KeyError as e:
            raise TvqError(f"smp has no encoder {name!r} or weights {weights!r} for it ({str(e).strip()[:120]}); "
                           "give an smp encoder name or tu-<timm model>") from None
        except Exception as e:  # noqa: BLE001  (hub / timm errors of every kind)
            if tag is None or "Unknown model" in str(e):
                raise TvqError(f"cannot build smp encoder {name!r}: {str(e).splitlines()[0][:160]}") from None
            raise _missing_weights(name, tag, e) from None
        if next(inner.named_parameters(recurse=False), None) or next(inner.named_buffers(recurse=False), None):
            raise TvqError(f"smp encoder {name!r} holds tensors outside its submodules, which DenseEncoder cannot "
                           "share; use another encoder (e.g. resnet50 or a tu-<timm> one)")
        object.__setattr__(self, "_inner", inner)      # not a child: its submodules are adopted (shared) below
        for child_name, child in inner.named_children():
            self.add_module(child_name, child)
        self.name = name
        self.output_stride = int(output_stride)
        self.depth = int(depth)
        self.out_channels: tuple[int, ...] = tuple(int(c) for c in inner.out_channels)
        if local:
            self.load_weights(weights)

    def load_weights(self, path: str | Path) -> None:
        """Load a local state-dict file with this encoder's keys (strict)."""
        from ..store.checkpoints import load_state_dict

        p = Path(path)
        if not p.is_file():
            raise TvqError(f"encoder weights {p} do not exist; give a state-dict file with the {self.name} encoder's keys")
        sd = load_state_dict(p)
        try:
            self.load_state_dict(dict(sd), strict=True)
        except RuntimeError as e:
            raise TvqError(f"{p} does not fit smp encoder {self.name!r} ({str(e).strip().splitlines()[0][:160]}); "
                           "give the encoder's own state dict (no 'encoder.' prefix)") from None

    def train(self, mode: bool = True) -> DenseEncoder:
        super().train(mode)
        self._inner.training = mode
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        return self._inner(x)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, output_stride={self.output_stride}, out_channels={self.out_channels}"


class DenseHead(nn.Module):
    """One task's decoder: ``forward(features) -> (B, out_channels, H, W)`` at the input size.

    Args:
        encoder_channels: the encoder's ``out_channels`` (``DenseEncoder.out_channels``).
        out_channels: output channels (classes; 1 for depth; 3 for normals).
        decoder: ``unet``, ``fpn``, ``deeplabv3`` (ASPP on the deepest map) or ``deeplabv3plus``.
        decoder_channels: unet: one width per block (as many as encoder stages, default
            (256, 128, 64, 32, 16)); fpn: ``(pyramid, segmentation)`` (default (256, 128));
            deeplab: the ASPP width (default 256). FPN's segmentation width must be a multiple of 32.
        upsampling: None: resize the output to the input's H x W (``features[0]``), bilinear;
            an int: a fixed bilinear scale factor instead (1: none).
        atrous_rates: the ASPP dilation rates (deeplab decoders).
        encoder_output_stride: the encoder's output stride (deeplabv3plus only: 8 or 16).
        dropout: ASPP projection dropout (deeplab) / FPN dropout.
    """

    def __init__(self, encoder_channels: Sequence[int], out_channels: int, decoder: str = "unet",
                 decoder_channels: int | Sequence[int] | None = None, upsampling: int | None = None,
                 atrous_rates: Sequence[int] = (12, 24, 36), encoder_output_stride: int = 8, dropout: float = 0.5):
        super().__init__()
        if decoder not in DECODERS:
            raise TvqError(f"unknown dense decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
        encoder_channels = [int(c) for c in encoder_channels]
        if decoder_channels is None:
            decoder_channels = _DEFAULT_CHANNELS[decoder]
        if decoder == "unet" and len(decoder_channels) != len(encoder_channels) - 1:
            raise TvqError(f"unet decoder_channels needs {len(encoder_channels) - 1} widths (one per encoder stage), "
                           f"got {list(decoder_channels)}")
        self.config: dict[str, Any] = {
            "encoder_channels": encoder_channels, "out_channels": int(out_channels), "decoder": decoder,
            "decoder_channels": decoder_channels if isinstance(decoder_channels, int) else [int(c) for c in decoder_channels],
            "upsampling": upsampling, "atrous_rates": [int(r) for r in atrous_rates],
            "encoder_output_stride": int(encoder_output_stride), "dropout": float(dropout)}
        self.decoder, width = _build_decoder(**{k: v for k, v in self.config.items()
                                                if k not in ("out_channels", "upsampling")})
        self.head = nn.Conv2d(width, int(out_channels), kernel_size=1 if decoder.startswith("deeplab") else 3,
                              padding=0 if decoder.startswith("deeplab") else 1)
        self.upsampling = upsampling

    @property
    def out_channels(self) -> int:
        return self.config["out_channels"]

    @property
    def in_channels(self) -> int:
        """The deepest encoder width the head reads."""
        return self.config["encoder_channels"][-1]

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if isinstance(features, Tensor):
            raise TvqError("DenseHead reads the encoder's list of multi-scale features, not one tensor; "
                           "use a DenseEncoder (smp encoder)")
        size = features[0].shape[-2:]
        if self.config["decoder"] == "fpn":
            if size[0] % 32 or size[1] % 32:
                raise TvqError(f"the fpn decoder needs inputs whose height and width are multiples of 32, got "
                               f"{tuple(size)}; resize or pad the images, or use the unet / deeplabv3 decoder")
            if features[-1].shape[-2:] == features[-2].shape[-2:]:
                raise TvqError("the fpn decoder needs an undilated encoder (output_stride 32); "
                               "use the unet / deeplab decoders with a dilated one")
        out = self.head(self.decoder(list(features)))
        if self.upsampling is None:
            if out.shape[-2:] != size:
                out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        elif self.upsampling > 1:
            out = F.interpolate(out, scale_factor=self.upsampling, mode="bilinear", align_corners=False)
        return out

    def save(self, path: str | Path) -> None:
        """Write the head as safetensors; the metadata holds its constructor config (JSON)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(sd, str(path), metadata={"format": HEAD_FORMAT, "config": json.dumps(self.config)})

    @classmethod
    def load(cls, path: str | Path) -> DenseHead:
        """A head written by :meth:`save`."""
        from ..store.checkpoints import load_state_dict, read_safetensors_header

        path = Path(path)
        if not path.is_file():
            raise TvqError(f"dense head {path} does not exist; write heads with DenseHead.save (or fine-tune first)")
        try:
            _, meta, _ = read_safetensors_header(path)
        except TvqError:
            raise TvqError(f"{path} is not a DenseHead file (no safetensors header); save heads with DenseHead.save") from None
        if (meta or {}).get("format") != HEAD_FORMAT or "config" not in meta:
            raise TvqError(f"{path} is not a DenseHead file (no {HEAD_FORMAT} config in its metadata); "
                           "save heads with DenseHead.save")
        try:
            head = cls(**json.loads(meta["config"]))
            head.load_state_dict(dict(load_state_dict(path)), strict=True)
        except (RuntimeError, TypeError, ValueError) as e:
            raise TvqError(f"{path}: its tensors do not fit its DenseHead config ({str(e).strip().splitlines()[0][:160]}); "
                           "re-save it with DenseHead.save") from None
        return head


def _build_decoder(encoder_channels: list[int], decoder: str, decoder_channels: Any, atrous_rates: list[int], encoder_output_stride: int, dropout: float) -> tuple[nn.Module, int]:
    """The smp decoder module and its output width."""
    _smp()
    depth = len(encoder_channels) - 1
    if decoder == "unet":
        from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder

        return UnetDecoder(encoder_channels, list(decoder_channels), n_blocks=depth), int(decoder_channels[-1])
    if decoder == "fpn":
        from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder

        pyramid, seg = (decoder_channels, decoder_channels // 2) if isinstance(decoder_channels, int) else decoder_channels
        if int(seg) % 32:
            raise TvqError(f"fpn decoder_channels (pyramid, segmentation): segmentation must be a multiple of 32 "
                           f"(GroupNorm(32)), got {seg}")
        dec = FPNDecoder(encoder_channels, encoder_depth=depth, pyramid_channels=int(pyramid),
                         segmentation_channels=int(seg), dropout=dropout)
        return dec, dec.out_channels
    from segmentation_models_pytorch.decoders.deeplabv3.decoder import DeepLabV3Decoder, DeepLabV3PlusDecoder

    width = int(decoder_channels if isinstance(decoder_channels, int) else decoder_channels[0])
    if decoder == "deeplabv3":
        return DeepLabV3Decoder(encoder_channels[-1], width, atrous_rates, aspp_separable=False,
                                aspp_dropout=dropout), width
    if encoder_output_stride not in (8, 16):
        raise TvqError(f"deeplabv3plus needs encoder_output_stride 8 or 16, got {encoder_output_stride}")
    return DeepLabV3PlusDecoder(encoder_channels, depth, width, atrous_rates, encoder_output_stride,
                                aspp_separable=True, aspp_dropout=dropout), width


def paper_nyuv2(weights: str | bool | None = None, tasks: Sequence[str] = ("segmentation", "depth", "normal"),
                ) -> tuple[DenseEncoder, dict[str, DenseHead]]:
    """The papers' NYUv2 model: dilated ResNet-50 (output stride 8) + a DeepLab ASPP head per task."""
    enc = DenseEncoder(weights=weights, **PAPER_NYUV2["encoder"])
    heads = {t: DenseHead(enc.out_channels, PAPER_NYUV2["out_channels"][t], **PAPER_NYUV2["head"]) for t in tasks}
    return enc, heads
