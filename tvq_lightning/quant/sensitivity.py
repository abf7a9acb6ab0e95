"""Quantization sensitivity of each tensor: the mean squared gradient of a loss (a diagonal-Fisher
estimate), the weight ``w_k`` of the bit allocator's objective ``sum_k w_k ||tau_k - tau_hat_k||^2``.

Pure autograd, no Lightning: :class:`~tvq_lightning.callbacks.BitAllocation` wraps it around a
Trainer's loader and precision context, the demo calls it on every task's training data.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor


def accumulate_squared_gradients(loss_fn: Callable[[int, Any], Tensor], params: Sequence[Tensor],
                                 batches: Iterable, num_batches: int,
                                 dtype: torch.dtype = torch.float64) -> tuple[Tensor, int]:
    """``(sums, count)``: over the first ``num_batches`` of ``batches`` (``count`` of them), the sum
    of ``mean_i g_i^2`` per parameter, ``g = d loss_fn(i, batch) / d param``.

    ``params`` must require gradients; nothing is written to their ``.grad`` (``autograd.grad``), so
    an optimizer or DDP's reducer sees nothing. A parameter the loss does not reach adds 0.
    """
    if not params:
        raise ValueError("accumulate_squared_gradients needs at least one parameter")
    sums = torch.zeros(len(params), dtype=dtype, device=params[0].device)
    count = 0
    for i, batch in enumerate(batches):
        if i >= num_batches:
            break
        with torch.enable_grad():
            loss = loss_fn(i, batch)
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
        for j, g in enumerate(grads):
            if g is not None:
                sums[j] += g.detach().to(dtype).pow(2).mean()
        count += 1
    return sums, count
