"""Set-up of the demo: θ0 (the shipped tiny CLIP), zero-shot heads, and the tasks' stem features.

The fine-tuned part of the model is the top of the image tower (``visual.top``); its θ0 is written
to ``OUT/pretrained.safetensors``, the file every store of the demo is fingerprinted against. The
frozen convolutional stem turns each split's images into features once; they are cached under
the data cache, keyed on the stem weights' hash and the data's version, seed and sizes.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..data.embedded import TASKS, task_split
from ..data.embedded.datamodules import apply_frozen
from ..data.embedded.generate import TASKS_VERSION, cache_dir
from ..models.heads import ClassificationHead
from ..models.tiny_clip import TinyClip, load_tiny_clip
from ..models.zeroshot import zeroshot_heads
from ..store.st_stream import save_safetensors
from .config import DemoConfig

Split = tuple[Tensor, Tensor]


@dataclass
class Bench:
    """What every phase of the demo shares."""

    cfg: DemoConfig
    clip: TinyClip
    pretrained_path: Path                       # θ0 of visual.top
    heads: dict[str, ClassificationHead]        # zero-shot heads, fixed before fine-tuning
    data: dict[str, dict[str, Split]]           # task -> split -> (stem features, labels)

    @property
    def tasks(self) -> list[str]:
        return list(self.cfg.tasks)

    @property
    def num_classes(self) -> dict[str, int]:
        return {t: TASKS[t].num_classes for t in self.tasks}

    def top(self) -> nn.Module:
        """A fresh copy of θ0's ``visual.top`` (the module that is fine-tuned and merged)."""
        return copy.deepcopy(self.clip.visual.top)

    def pretrained(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.clip.visual.top.state_dict().items()}


def _weights_hash(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def stem_features(stem: nn.Module, task: str, split: str, seed: int, size: int) -> Split:
    """The stem's features of one split (cached), and the labels."""
    images, labels = task_split(task, split, seed, size)
    path = cache_dir() / f"features-{_weights_hash(stem)}-tasks-v{TASKS_VERSION}-seed{seed}-{task}-{split}-{size}.npy"
    if path.exists():
        feats = torch.from_numpy(np.load(path))
    else:
        feats = apply_frozen(stem, images)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npy")
        np.save(tmp, feats.numpy())
        tmp.replace(path)
    return feats, torch.from_numpy(labels)


def prepare(cfg: DemoConfig, out: Path, clip_dir: str | Path | None = None, progress=None) -> Bench:
    clip = load_tiny_clip(clip_dir)
    heads = zeroshot_heads(clip, clip.tokenizer, {t: (TASKS[t].classnames, TASKS[t].templates) for t in cfg.tasks})
    sizes = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}
    data: dict[str, dict[str, Split]] = {}
    for task in cfg.tasks:
        data[task] = {s: stem_features(clip.visual.stem, task, s, cfg.seed, n) for s, n in sizes.items()}
        if progress is not None:
            progress(task)
    pretrained_path = save_safetensors({k: v.detach().contiguous() for k, v in clip.visual.top.state_dict().items()},
                                       out / "pretrained.safetensors")
    return Bench(cfg, clip, pretrained_path, heads, data)
