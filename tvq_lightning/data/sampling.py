"""Evaluation under DDP without duplicated samples.

Lightning's default ``DistributedSampler`` pads every rank to the same length by repeating
samples, which biases per-task accuracy and sample counts. :class:`UnpaddedDistributedSampler`
gives rank ``r`` of ``W`` the indices ``r, r + W, ...``: every sample exactly once. Lightning keeps
a sampler of this type in place instead of injecting its own.
"""
from __future__ import annotations

import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank r of W gets indices ``r, r + W, r + 2W, ...``: every sample exactly once, no padding."""

    def __init__(self, dataset, num_replicas: int | None = None, rank: int | None = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(self.rank, len(dataset), self.num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def unpadded_eval_loader(loader: DataLoader) -> DataLoader:
    """``loader`` with an :class:`UnpaddedDistributedSampler` when torch.distributed runs (else as is)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=UnpaddedDistributedSampler(loader.dataset),
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      drop_last=False)
