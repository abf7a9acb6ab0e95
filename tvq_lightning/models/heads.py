"""Per-task classification heads in the CLIP zero-shot form.

A head is a linear map on L2-normalised features: ``logits = normalize(z) @ W.T + b``. Zero-shot
heads have rows = normalised class embeddings times exp(logit_scale) (about 100) and bias 0;
linear-probe heads are fitted on frozen features. Heads are never part of a task vector.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import TvqError


class ClassificationHead(nn.Module):
    """``logits = normalize(features) @ weight.T + bias`` (set ``normalize=False`` for raw features)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, normalize: bool = True):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone().float())
        self.bias = nn.Parameter(torch.zeros(weight.shape[0]) if bias is None else bias.detach().clone().float())
        self.normalize = normalize

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def forward(self, features: Tensor) -> Tensor:
        if self.normalize:
            features = F.normalize(features, dim=-1)
        return F.linear(features, self.weight, self.bias)

    @classmethod
    def load(cls, path: str | Path) -> ClassificationHead:
        """A head saved by :meth:`save` (safetensors with ``weight``, ``bias`` and, in its metadata,
        ``normalize``; files without it are normalising heads)."""
        from ..store.checkpoints import open_checkpoint

        with open_checkpoint(path) as sd:
            if "weight" not in sd:
                raise TvqError(f"{path} holds no head 'weight' tensor; save heads with ClassificationHead.save")
            normalize = sd.metadata.get("normalize", "true")
            if normalize not in ("true", "false"):
                raise TvqError(f"{path}: metadata normalize={normalize!r} is neither 'true' nor 'false'; re-save the head")
            return cls(sd["weight"], sd.get("bias"), normalize=normalize == "true")

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write the head atomically as safetensors; ``normalize`` (and ``metadata``) go in its metadata."""
        from ..store.st_stream import save_safetensors

        tensors = {"weight": self.weight.detach().cpu().contiguous(), "bias": self.bias.detach().cpu().contiguous()}
        return save_safetensors(tensors, path, {**(metadata or {}), "normalize": "true" if self.normalize else "false"})
