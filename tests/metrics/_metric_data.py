"""Random dense batches shared by the metric tests and their DDP script (deterministic per seed)."""
from __future__ import annotations

import torch

C = 6          # class 5 is never labelled nor predicted; class 4 is predicted but never labelled


def seg_batch(seed: int, b: int = 3, h: int = 5, w: int = 7, all_ignored: bool = False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, C, h, w, generator=g)
    logits[:, 5] = -1e4
    labels = torch.randint(0, 4, (b, h, w), generator=g)
    labels[torch.rand(b, h, w, generator=g) < 0.2] = -1
    labels[torch.rand(b, h, w, generator=g) < 0.05] = -7                  # any negative label is ignored
    if all_ignored:
        labels.fill_(-1)
    return logits, labels


def depth_batch(seed: int, b: int = 3, h: int = 5, w: int = 7, all_invalid: bool = False):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(b, 1, h, w, generator=g) * 4 + 0.1
    target[torch.rand(b, 1, h, w, generator=g) < 0.3] = 0.0
    target[0, 0, 0, 0] = -1.0                                              # negative: invalid too
    if all_invalid:
        target.zero_()
    return torch.randn(b, 1, h, w, generator=g) + target, target


def normal_batch(seed: int, b: int = 3, h: int = 5, w: int = 7, all_invalid: bool = False):
    g = torch.Generator().manual_seed(seed)
    target = torch.nn.functional.normalize(torch.randn(b, 3, h, w, generator=g), dim=1)
    target = target * (torch.rand(b, 1, h, w, generator=g) > 0.25)     # zero length: invalid
    preds = target * 2 + 0.6 * torch.randn(b, 3, h, w, generator=g)    # unnormalised predictions
    if all_invalid:
        target = torch.zeros_like(target)
    return preds, target
