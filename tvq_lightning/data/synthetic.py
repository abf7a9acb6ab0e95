"""Synthetic fine-tunes: small low-rank-plus-noise task vectors on top of given weights.

The updates are about 100x narrower in range than the weights, as real fine-tuning gives. Used by
the benchmarks and the tests; nothing here downloads anything.
"""
from __future__ import annotations

import torch


def synthetic_task_vector(sd: dict[str, torch.Tensor], seed: int, scale: float = 1e-3, rank: int = 4) -> dict[str, torch.Tensor]:
    """A fine-tuning-like update: low rank plus noise for matrices, small noise elsewhere."""
    g = torch.Generator().manual_seed(seed)
    tau = {}
    for k, v in sd.items():
        if not v.is_floating_point():
            continue
        if v.dim() >= 2:
            m = v.reshape(v.shape[0], -1)
            r = min(rank, *m.shape)
            low = torch.randn(m.shape[0], r, generator=g) @ torch.randn(r, m.shape[1], generator=g) / r ** 0.5
            tau[k] = (scale * (low + 0.5 * torch.randn(m.shape, generator=g))).reshape(v.shape)
        else:
            tau[k] = scale * torch.randn(v.shape, generator=g)
    return tau


def synthetic_finetunes(pretrained: dict[str, torch.Tensor], num_tasks: int, seed: int = 1, scale: float = 1e-3) -> list[dict[str, torch.Tensor]]:
    """``num_tasks`` fine-tuned state dicts theta_0 + tau_t (integer buffers copied)."""
    out = []
    for t in range(num_tasks):
        tau = synthetic_task_vector(pretrained, seed * 1000 + t, scale)
        out.append({k: (v + tau[k]).to(v.dtype) if k in tau else v.clone() for k, v in pretrained.items()})
    return out
