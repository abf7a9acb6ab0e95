"""Read FusionBench's NYUv2 checkpoints into a task-vector store plus per-task dense heads.

FusionBench's NYUv2 model pool (as of its releases up to 2025, which follow Auto-Lambda's
``MTLDeepLabv3``) is a ResNet-50 dilated to output stride 8 shared by the tasks
``segmentation`` (13 classes), ``depth`` (1) and ``normal`` (3), with one torchvision-style
DeepLab head per task. The key layout this reader assumes (inferred, not read from FusionBench's
code; a checkpoint that differs is refused with the first offending key):

- fine-tuned checkpoints: a Lightning ``.ckpt`` (its ``state_dict``) or a plain state dict
  (``.pt/.pth/.bin/.safetensors``) with

  - ``encoder.<k>``: the dilated ResNet-50, ``<k>`` torchvision's ResNet keys without ``fc``
    (``conv1.weight``, ``bn1.running_mean``, ``layer4.2.bn3.weight``, ...), which are exactly
    smp's ``resnet50`` encoder keys (:class:`~tvq_lightning.models.dense.DenseEncoder`);
  - ``decoders.<task>.<k>``: torchvision's ``DeepLabHead`` (a Sequential): ``0.convs.{0..4}.*``
    and ``0.project.*`` (ASPP, rates 12/24/36), ``1.weight`` (3x3 conv), ``2.*`` (BatchNorm),
    ``4.weight`` / ``4.bias`` (the 1x1 output conv). Other tasks' decoders may be present and are
    ignored;
- the pre-trained model: the same layout (only ``encoder.`` is read), or a bare ResNet state dict
  (torchvision's ``resnet50`` weights; its ``fc.*`` classifier is dropped).

The head keys map onto :class:`~tvq_lightning.models.dense.DenseHead` (``decoder="deeplabv3"``)
as ``0.`` -> ``decoder.aspp.``, ``1.`` -> ``decoder.conv.``, ``2.`` -> ``decoder.bn.``,
``4.`` -> ``head.``; the ASPP width and output channels are read from the shapes.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import CheckpointError, IncompatibleWeights
from .checkpoints import load_state_dict
from .st_stream import save_safetensors
from .layout import StoreConfig
from .writer import quantize_to_store

ENCODER_PREFIX = "encoder."
DECODER_PREFIX = "decoders."
_HEAD_MAP = (("0.", "decoder.aspp."), ("1.", "decoder.conv."), ("2.", "decoder.bn."), ("4.", "head."))
_TORCHVISION_CLASSIFIER = ("fc.weight", "fc.bias")


def _read(source: str | Path | Mapping[str, Tensor], pickles: dict[str, bool]) -> tuple[dict[str, Tensor], str]:
    if isinstance(source, Mapping):
        return dict(source), "the given state dict"
    return load_state_dict(source, **pickles), str(source)


def _split(sd: Mapping[str, Tensor], label: str, bare_ok: bool) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """``(encoder keys, {task: head keys})`` of a FusionBench state dict (prefixes stripped)."""
    if bare_ok and not any(k.startswith(ENCODER_PREFIX) for k in sd):
        return {k: v for k, v in sd.items() if k not in _TORCHVISION_CLASSIFIER}, {}
    enc: dict[str, Tensor] = {}
    heads: dict[str, dict[str, Tensor]] = {}
    for k, v in sd.items():
        if k.startswith(ENCODER_PREFIX):
            enc[k[len(ENCODER_PREFIX):]] = v
        elif k.startswith(DECODER_PREFIX) and k.count(".") >= 2:
            task, rest = k[len(DECODER_PREFIX):].split(".", 1)
            heads.setdefault(task, {})[rest] = v
        else:
            raise CheckpointError(f"{label}: key {k!r} is neither 'encoder.*' nor 'decoders.<task>.*'; give a FusionBench "
                                  "NYUv2 checkpoint (see tvq_lightning.store.fusionbench_nyuv2 for the layout)")
    if not enc:
        raise CheckpointError(f"{label} holds no 'encoder.*' keys; give a FusionBench NYUv2 checkpoint")
    return enc, heads


def _check_encoder(sd: Mapping[str, Tensor], reference: Mapping[str, Tensor], label: str, name: str) -> dict[str, Tensor]:
    missing = [k for k in reference if k not in sd]
    extra = [k for k in sd if k not in reference]
    if missing or extra:
        what = f"lacks encoder key {missing[0]!r}" if missing else f"has encoder key {extra[0]!r}, unknown to"
        raise IncompatibleWeights(f"{label} {what} smp's {name!r} encoder; give the FusionBench checkpoint of a "
                                  f"{name} encoder (or pass encoder= the smp name it was trained with)")
    bad = next((k for k in reference if tuple(sd[k].shape) != tuple(reference[k].shape)), None)
    if bad is not None:
        raise IncompatibleWeights(f"{label}: encoder key {bad!r} has shape {tuple(sd[bad].shape)}, smp's {name!r} has "
                                  f"{tuple(reference[bad].shape)}; pass encoder= the smp name it was trained with")
    return {k: sd[k] for k in reference}


def convert_head(keys: Mapping[str, Tensor], encoder_channels: tuple[int, ...], label: str):
    """A :class:`~tvq_lightning.models.dense.DenseHead` (deeplabv3) from a torchvision ``DeepLabHead``
    state dict, for an encoder of ``encoder_channels``."""
    from ..models.dense import DenseHead

    for need in ("0.convs.0.0.weight", "4.weight"):
        if need not in keys:
            raise CheckpointError(f"{label}: the DeepLab head lacks key {need!r}; give a complete FusionBench checkpoint")
    mapped = {}
    for k, v in keys.items():
        new = next((dst + k[len(src):] for src, dst in _HEAD_MAP if k.startswith(src)), None)
        if new is None:
            raise CheckpointError(f"{label}: head key {k!r} is not part of a DeepLab head (0.* ASPP, 1.* conv, 2.* BN, "
                                  "4.* output conv); give a FusionBench NYUv2 checkpoint")
        mapped[new] = v
    width = int(mapped["decoder.aspp.convs.0.0.weight"].shape[0])
    head = DenseHead(encoder_channels, int(mapped["head.weight"].shape[0]), decoder="deeplabv3", decoder_channels=width)
    try:
        head.load_state_dict(mapped, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise CheckpointError(f"{label}: the DeepLab head does not fit a {width}-wide ASPP head ({first}); "
                              "give a complete FusionBench checkpoint") from None
    return head


def import_fusionbench_nyuv2(pretrained: str | Path | Mapping[str, Tensor],
                             finetuned: Mapping[str, str | Path | Mapping[str, Tensor]], out_store: str | Path,
                             heads_dir: str | Path, config: StoreConfig = StoreConfig("tvq", bits=4), *,
                             encoder: str = "resnet50", pretrained_out: str | Path | None = None,
                             allow_pickle: bool = False, overwrite: bool = False,
                             trust_pickle_code: bool = False) -> dict[str, Any]:
    """Split FusionBench NYUv2 checkpoints: encoders -> a task-vector store, heads -> DenseHead files.

    Args:
        pretrained: θ0 (a FusionBench checkpoint or torchvision's ResNet weights; see the module docstring).
        finetuned: ``{task: checkpoint}`` (task = the ``decoders.<task>`` name: segmentation / depth / normal).
        out_store: the store to write (``quantize_to_store`` with ``config``).
        heads_dir: where ``<task>.safetensors`` heads go (``heads_dir`` of the evaluation modules).
        encoder: the smp encoder name the keys are checked against (``resnet50``).
        pretrained_out: where θ0's encoder state dict is written (default ``<out_store>/../pretrained.safetensors``),
            the ``pretrained:`` of the evaluation configs.
        allow_pickle: Lightning ``.ckpt`` files holding pickled objects need it (read through an allow-list of
            classes; no code from the file runs).
        trust_pickle_code: unpickle with plain ``torch.load`` instead, running code from the file (trusted files
            whose pickled objects the allow-list refuses).

    Returns ``{"store", "pretrained", "heads": {task: path}}``.
    """
    from ..models.dense import DenseEncoder

    if not finetuned:
        raise CheckpointError("no fine-tuned checkpoints given; pass {task: path} for segmentation / depth / normal")
    ref_encoder = DenseEncoder(encoder, output_stride=8)
    reference = ref_encoder.state_dict()
    pickles = {"allow_pickle": allow_pickle, "trust_pickle_code": trust_pickle_code}
    pre_sd, label = _read(pretrained, pickles)
    theta0 = _check_encoder(_split(pre_sd, label, bare_ok=True)[0], reference, label, encoder)
    encoders, heads = {}, {}
    for task, src in finetuned.items():
        sd, label = _read(src, pickles)
        enc, task_heads = _split(sd, label, bare_ok=False)
        if task not in task_heads:
            raise CheckpointError(f"{label} has no 'decoders.{task}.*' keys (it has decoders for: "
                                  f"{', '.join(task_heads) or 'none'}); name each checkpoint by its task")
        encoders[task] = _check_encoder(enc, reference, label, encoder)
        heads[task] = convert_head(task_heads[task], ref_encoder.out_channels, f"{label} (decoders.{task})")
    out_store, heads_dir = Path(out_store), Path(heads_dir)
    pre_path = Path(pretrained_out) if pretrained_out is not None else out_store.parent / "pretrained.safetensors"
    pre_path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.contiguous() for k, v in theta0.items()}, pre_path)
    quantize_to_store(theta0, encoders, out_store, config, overwrite=overwrite, progress=False)
    heads_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for task, head in heads.items():
        paths[task] = heads_dir / f"{task}.safetensors"
        head.save(paths[task])
    return {"store": out_store, "pretrained": pre_path, "heads": paths}
