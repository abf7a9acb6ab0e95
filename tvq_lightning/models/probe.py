"""Classification heads without a text tower: a linear probe on frozen features, or saved files.

:func:`fit_linear_probe` stands in for CLIP's zero-shot head when no text encoder is at hand:
it extracts the frozen encoder's L2-normalised features once, then fits a multinomial logistic
regression by full-batch Adam from a zero start. Everything is deterministic (no sampling, a
fixed order of batches), so the same encoder and data give the same head.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import TvqError
from .heads import ClassificationHead


def _images_labels(batch) -> tuple[Tensor, Tensor]:
    if isinstance(batch, Mapping):
        batch = (batch.get("images", batch.get("image")), batch.get("labels", batch.get("label")))
    if not isinstance(batch, (tuple, list)) or len(batch) < 2 or batch[0] is None or batch[1] is None:
        raise TvqError("fit_linear_probe needs labelled batches (images, labels); "
                       "give the task's training loader (e.g. ToyTasks(train_task=...).train_dataloader())")
    return batch[0], batch[1]


@torch.no_grad()
def extract_features(encoder: nn.Module, dataloader: Iterable, device: str | torch.device | None = None,
                     max_batches: int | None = None) -> tuple[Tensor, Tensor]:
    """L2-normalised features (float32, CPU) and labels of every batch, encoder in eval mode."""
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        for i, batch in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = _images_labels(batch)
            feats.append(F.normalize(encoder(x.to(device)).float(), dim=-1).cpu())
            labels.append(y.cpu().long())
    finally:
        encoder.train(was_training)
    if not feats:
        raise TvqError("fit_linear_probe got an empty dataloader; it needs labelled training data")
    return torch.cat(feats), torch.cat(labels)


def fit_linear_probe(encoder: nn.Module, dataloader: Iterable, num_classes: int, *, steps: int = 300,
                     lr: float = 0.1, weight_decay: float = 1e-4, device: str | torch.device | None = None,
                     max_batches: int | None = None) -> ClassificationHead:
    """A :class:`ClassificationHead` fitted on the frozen encoder's normalised features.

    Args:
        encoder: ``encoder(images) -> features``; not modified (gradients are not taken).
        dataloader: labelled batches ``(images, labels)``.
        num_classes: rows of the head; labels must lie in ``0..num_classes-1``.
        steps: full-batch Adam steps on the cross-entropy (a few hundred suffice).
        lr: Adam's learning rate.
        weight_decay: L2 penalty on the weight (keeps the logits' scale bounded).
        device: where to run the encoder (default: where its parameters are).
        max_batches: use only this many batches of ``dataloader``.
    """
    if num_classes < 1:
        raise TvqError(f"num_classes={num_classes} must be >= 1")
    x, y = extract_features(encoder, dataloader, device, max_batches)
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise TvqError(f"labels span {int(y.min())}..{int(y.max())} but num_classes={num_classes}; "
                       f"give the task's true class count")
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(F.linear(x, weight, bias), y) + weight_decay * weight.square().sum()
            loss.backward()
            opt.step()
    return ClassificationHead(weight.detach(), bias.detach(), normalize=True)


def heads_from_files(paths: Mapping[str, str | Path]) -> dict[str, ClassificationHead]:
    """``{task: ClassificationHead.load(path)}`` for heads saved with :meth:`ClassificationHead.save`."""
    heads = {}
    for task, path in paths.items():
        if not Path(path).is_file():
            raise TvqError(f"head file {path} for task {task!r} does not exist; "
                           f"save heads with ClassificationHead.save")
        heads[task] = ClassificationHead.load(path)
    return heads
