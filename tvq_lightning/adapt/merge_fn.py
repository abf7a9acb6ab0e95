"""The differentiable merge over packed task vectors: theta_k = theta0_k + sum_t lambda_{k,t} tau_{k,t}.

Memory design. With plain autograd, ``theta0 + sum_t lam[t] * tau_t`` keeps every ``tau_t`` alive
for the backward pass: T float32 copies of the model, exactly what quantized task vectors are
meant to avoid. :class:`MergeKey` is an ``autograd.Function`` that saves nothing but a reference
to the :class:`~.packed.PackedTaskVectors` module and the key's name:

- forward: decode tau_t one task at a time from the packed codes, accumulate into the output;
- backward: decode tau_t AGAIN, one at a time, and take ``dlam_t = <dtheta_k, tau_t>``;
  ``dtheta0_k = dtheta_k`` (only if theta0 needs a gradient).

So between forward and backward the only float tensors the merge holds are the merged weights
themselves (which the network needs anyway); at any moment at most one task vector is decoded.
The price is decoding each task vector twice per step, which is cheap next to the forward and
backward passes of the network.

:func:`merged_params` builds the merged weights of every store key once per optimizer step, for
``torch.func.functional_call(encoder, params, (images,))`` — one merge shared by every task's
forward in that step. :class:`~.streamed.StreamedEncoder` instead applies ``MergeKey`` block by
block inside the forward, so that the merged weights and their gradients are never all alive.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..errors import TvqError
from .packed import PackedTaskVectors


class MergeKey(torch.autograd.Function):
    """``MergeKey.apply(coeffs, theta0, packed, key)``: one key's merged weight.

    ``coeffs`` has one entry per task of ``packed`` (already clamped); ``theta0`` is the key's
    pre-trained tensor on the packed buffers' device. The result has theta0's dtype; the merge is
    computed in float32.
    """

    @staticmethod
    def forward(ctx, coeffs: Tensor, theta0: Tensor, packed: PackedTaskVectors, key: str) -> Tensor:
        if coeffs.dim() != 1 or coeffs.shape[0] != len(packed.tasks):
            raise TvqError(f"key {key!r}: expected {len(packed.tasks)} coefficients (one per task), got shape {tuple(coeffs.shape)}")
        out = theta0.detach().to(torch.float32, copy=True)
        lam = coeffs.detach().to(torch.float32)
        for t, tau in packed.iter_task_vectors(key, readonly=True):
            out.addcmul_(tau, lam[t])
        ctx.packed, ctx.key = packed, key
        ctx.coeff_dtype = coeffs.dtype
        ctx.theta_dtype = theta0.dtype
        return out if theta0.dtype == torch.float32 else out.to(theta0.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        packed: PackedTaskVectors = ctx.packed
        dlam = coefficient_grad(packed, ctx.key, grad).to(ctx.coeff_dtype) if ctx.needs_input_grad[0] else None
        dtheta = grad.to(ctx.theta_dtype) if ctx.needs_input_grad[1] else None
        return dlam, dtheta, None, None


def coefficient_grad(packed: PackedTaskVectors, key: str, grad: Tensor) -> Tensor:
    """``d lambda_t = <grad, tau_t>`` (float32, one entry per task) for the weight gradient ``grad``
    of ``key``; each tau_t is decoded again, one at a time (nothing was saved)."""
    g = grad.reshape(-1).to(torch.float32)
    dlam = torch.zeros(len(packed.tasks), dtype=torch.float32, device=grad.device)
    for t, tau in packed.iter_task_vectors(key, readonly=True):
        dlam[t] = torch.dot(g, tau.reshape(-1))
    return dlam


def base_tensors(encoder: nn.Module) -> dict[str, Tensor]:
    """The encoder's own parameters and buffers by state-dict name (theta_0 of the merge)."""
    out = dict(encoder.named_buffers())
    out.update(encoder.named_parameters())
    return out


def check_coefficients(coeffs: Tensor, packed: PackedTaskVectors) -> None:
    """Check ``coeffs``' shape: ``(T,)`` task-wise or ``(K, T)`` layer-wise (K = store keys)."""
    T, K = len(packed.tasks), len(packed.keys)
    if tuple(coeffs.shape) not in ((T,), (K, T)):
        raise TvqError(f"coefficients of shape {tuple(coeffs.shape)} fit neither task-wise ({T},) nor layer-wise "
                       f"({K}, {T}) merging of store {packed.store_path}")


def merged_params(packed: PackedTaskVectors, base: Mapping[str, Tensor], coeffs: Tensor) -> dict[str, Tensor]:
    """``{name: theta0 + sum_t lam_t tau_t}`` for every store key some task changes.

    Args:
        packed: the task vectors.
        base: theta_0 by name (see :func:`base_tensors`), on ``packed``'s device.
        coeffs: clamped coefficients, ``(T,)`` (task-wise) or ``(K, T)`` (layer-wise, row k for
            ``packed.keys[k]``).

    Keys no task changes are left out: ``functional_call`` then uses the encoder's own tensor.
    """
    check_coefficients(coeffs, packed)
    layer = coeffs.dim() == 2
    out = {}
    for i, key in enumerate(packed.keys):
        if not packed.has_vector(key):
            continue
        if key not in base:
            raise TvqError(f"the encoder has no parameter or buffer {key!r} (a key of store {packed.store_path}); "
                           "give the encoder the store was built from (without a prefix)")
        out[key] = MergeKey.apply(coeffs[i] if layer else coeffs, base[key], packed, key)
    return out
