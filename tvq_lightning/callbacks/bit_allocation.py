"""Choose per-key bit widths for a run's task vector from gradient sensitivities under a budget.

:class:`BitAllocation` works together with :class:`~.quantize_on_save.QuantizeOnSave`. The
procedure (docs/algorithms.md §3, "bit allocation by quantization sensitivity"):

1. ``on_train_start`` (before the first optimizer step, after the training data is set up and
   the model is on its device): for ``num_batches`` training batches, the loss is
   ``pl_module.sensitivity_loss(batch)`` when the module defines it (FineTuneModule does),
   otherwise ``pl_module.training_step(batch, i)`` with logging switched off. Gradients are
   taken with ``torch.autograd.grad`` (no ``.grad`` is touched, the optimizer and DDP's reducer
   see nothing), with every parameter of ``submodule`` enabled for the pass and the whole module
   in eval mode (no dropout), inside the precision plugin's autocast. The sensitivity of key
   ``k`` is ``w_k = mean over batches of mean_i g_ki^2`` (a diagonal-Fisher estimate; the
   objective ``sum_k w_k ||tau_k - tau_hat_k||^2`` is then the Fisher-weighted error). The vector
   of ``w_k`` is averaged over ranks (``strategy.reduce``, mean), so every rank holds the same
   numbers. They are kept in the callback's checkpoint state: a resumed run does not recompute
   them at its fine-tuned weights. The batches come from the fit loop's own loader (with its
   distributed sampler); drawing them advances its shuffling, so the first epoch's order
   differs from a run without this callback (still deterministic for a seed).
   ``sensitivity="uniform"`` skips this step (``w_k = 1``).
2. When QuantizeOnSave writes a *new* store (global rank zero, at the end of training or at a
   checkpoint), it calls :meth:`BitAllocation.tvq_allocation` with theta_0 and the current
   weights: per quantized key an error table of this run's single task vector
   (:func:`~tvq_lightning.quant.allocation.key_error_table`, real quantizer, all widths 1..8),
   then :func:`~tvq_lightning.quant.allocation.allocate_bits` under ``budget`` (bits per
   quantized parameter per task) with the sensitivities as weights; ``per_tensor=True`` lets
   each tensor have its own width. Quantized keys that are buffers (no gradient) get the mean
   weight. For RTVQ, ``num_tasks`` is the number of tasks the store will hold: it prices the
   shared base (``b_base / T``), and the one-task error table is scaled by ``T`` as an estimate
   of the ``T``-task error (an approximation: the base of a one-task table is that task's vector).
3. The store records ``{**allocation.to_json(), "description", "sensitivity"}`` in its layout's
   ``allocation`` entry; tasks added later to that store take its recorded widths.

The result is also available as ``callback.allocation`` and ``pl_module._tvq_allocation``.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import CombinedLoader, rank_zero_warn
from torch import Tensor

from ..errors import TvqError
from ..quant.allocation import Allocation, ErrorTable, allocate_bits, key_error_table
from ..quant.policy import is_quantized
from ..quant.schemes import get_scheme, list_schemes
from ..quant.sensitivity import accumulate_squared_gradients
from ..store.layout import StoreConfig
from .quantize_on_save import QuantizeOnSave, submodule_of


class BitAllocation(Callback):
    """Sensitivity-weighted per-key bit widths under ``budget`` (see the module docstring).

    Args:
        budget: bits per quantized parameter per task.
        scheme: a scheme with bit allocation (``tvq``, ``rtvq``, ``bitdelta``); default:
            QuantizeOnSave's scheme (a different one is an error).
        num_tasks: schemes with a shared base (RTVQ): how many tasks the store will hold (prices the base).
        per_tensor: a width per tensor (True) or one width for all (False).
        num_batches: training batches for the gradient estimate.
        submodule: attribute path of the module whose keys are allocated (as in QuantizeOnSave).
        sensitivity: ``grad2`` (mean squared gradient) or ``uniform`` (all weights 1).
        min_bits, max_bits: the range of widths.
        max_samples: elements per tensor sampled for the error tables.
    """

    def __init__(self, budget: float, scheme: str | None = None, num_tasks: int = 1,
                 per_tensor: bool = True, num_batches: int = 8, submodule: str = "encoder",
                 sensitivity: Literal["grad2", "uniform"] = "grad2", min_bits: int = 1, max_bits: int = 8,
                 max_samples: int = 1 << 16):
        super().__init__()
        if sensitivity not in ("grad2", "uniform"):
            raise TvqError(f"BitAllocation sensitivity={sensitivity!r}: choose 'grad2' or 'uniform'")
        if num_batches < 1:
            raise TvqError(f"BitAllocation num_batches={num_batches} must be >= 1")
        self.budget, self.scheme, self.num_tasks, self.per_tensor = float(budget), scheme, num_tasks, per_tensor
        self.num_batches, self.submodule, self.sensitivity = num_batches, submodule, sensitivity
        self.min_bits, self.max_bits, self.max_samples = min_bits, max_bits, max_samples
        self.sensitivities: dict[str, float] | None = None
        self.allocation: Allocation | None = None

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"sensitivities": self.sensitivities,
                "allocation": None if self.allocation is None else self.allocation.to_json()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.sensitivities = state_dict.get("sensitivities")
        alloc = state_dict.get("allocation")
        self.allocation = None if alloc is None else Allocation.from_json(alloc)

    # -- step 1: sensitivities --------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        savers = [cb for cb in trainer.callbacks if isinstance(cb, QuantizeOnSave)]
        if not savers:
            rank_zero_warn("BitAllocation has no effect without a QuantizeOnSave callback in the same Trainer")
        for cb in savers:  # fail now rather than after training
            self._check_scheme(cb.config.scheme)

    def _check_scheme(self, scheme: str) -> None:
        if not get_scheme(scheme).allocation_fields:
            able = [n for n in list_schemes() if get_scheme(n).allocation_fields]
            raise TvqError(f"BitAllocation applies to the {', '.join(able)} schemes; QuantizeOnSave uses {scheme}")
        if self.scheme is not None and self.scheme != scheme:
            raise TvqError(f"BitAllocation scheme={self.scheme} but QuantizeOnSave scheme={scheme}; "
                           f"drop BitAllocation's scheme or make them equal")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sensitivity == "uniform" or self.sensitivities is not None:
            return
        self.sensitivities = self.estimate(trainer, pl_module)

    def estimate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Mean squared gradient per parameter of the sub-module, averaged over ranks."""
        module = submodule_of(pl_module, self.submodule)
        named = list(module.named_parameters())
        names, params = [n for n, _ in named], [p for _, p in named]
        if not params:
            raise TvqError(f"BitAllocation: {type(pl_module).__name__}.{self.submodule} has no parameters")
        dtype = torch.float32 if pl_module.device.type == "mps" else torch.float64  # mps has no float64
        flags = [p.requires_grad for p in params]
        modes = [(m, m.training) for m in pl_module.modules()]

        def loss_fn(i: int, batch) -> Tensor:
            with trainer.precision_plugin.forward_context():
                return _loss(pl_module, trainer.strategy.batch_to_device(batch), i)

        try:
            pl_module.eval()
            for p in params:
                p.requires_grad_(True)
            sums, count = accumulate_squared_gradients(loss_fn, params, _batches(trainer), self.num_batches, dtype)
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
            for m, mode in modes:
                m.training = mode
        if count == 0:
            raise TvqError("BitAllocation found no training batches to estimate sensitivities; "
                           "check the train dataloader or use sensitivity: uniform")
        mean = trainer.strategy.reduce(sums / count, reduce_op="mean")
        return {n: float(v) for n, v in zip(names, mean.cpu().tolist())}

    # -- step 2: the allocation ---------------------------------------------------------------------
    def tvq_allocation(self, pretrained: Mapping[str, Tensor], finetuned: Mapping[str, Tensor],
                       config: StoreConfig) -> tuple[Allocation, dict[str, float] | None]:
        """Widths for the task vector ``finetuned - pretrained`` under ``config``'s scheme and policy.

        Returns the allocation and the per-key weights it used (None: uniform).
        """
        scheme = config.scheme
        self._check_scheme(scheme)
        T = self.num_tasks if get_scheme(scheme).shared_file else 1
        keys = [k for k, v in pretrained.items() if is_quantized(k, v.shape, v.dtype, config.policy)]
        if not keys:
            raise TvqError(f"BitAllocation: no tensor of {self.submodule} is quantized under policy {config.policy!r}")
        tables = {}
        for k in keys:
            tau = finetuned[k].detach().float().cpu() - pretrained[k].detach().float().cpu()
            t = key_error_table([tau], scheme, spec=config.spec(config.bits), error_correction=config.error_correction,
                                max_samples=self.max_samples)
            tables[k] = ErrorTable(t.numel, scheme, T, t.errors * T) if T > 1 else t
        weights = self._weights(keys)
        self.allocation = allocate_bits(tables, self.budget, num_tasks=T, scheme=scheme, per_tensor=self.per_tensor,
                                        sensitivity=weights, min_bits=self.min_bits, max_bits=self.max_bits)
        return self.allocation, weights

    def _weights(self, keys: list[str]) -> dict[str, float] | None:
        if self.sensitivity == "uniform":
            return None
        if self.sensitivities is None:
            raise TvqError("BitAllocation has no sensitivities: training did not start (on_train_start estimates "
                           "them); use sensitivity: uniform to allocate without them")
        known = [self.sensitivities[k] for k in keys if k in self.sensitivities]
        fill = sum(known) / len(known) if known else 1.0
        weights = {k: float(self.sensitivities.get(k, fill)) for k in keys}
        if not all(math.isfinite(w) for w in weights.values()):
            raise TvqError("BitAllocation: a sensitivity is not finite (NaN/Inf gradients); check the loss")
        if sum(weights.values()) == 0:
            rank_zero_warn("BitAllocation: every sensitivity is zero (the loss has no gradient); allocating uniformly")
            return None
        return weights


def _batches(trainer: pl.Trainer) -> Iterator:
    """The training batches as the fit loop will see them (its loader, with any distributed sampler)."""
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()
    loader = trainer.train_dataloader
    if loader is None:
        raise TvqError("BitAllocation: the Trainer has no training data to estimate sensitivities")
    if isinstance(loader, (Mapping, list, tuple)):
        combined = CombinedLoader(loader, "max_size_cycle")
        iter(combined)
        for batch, _, _ in combined:
            yield batch
    else:
        yield from loader


def _loss(pl_module: pl.LightningModule, batch, i: int) -> Tensor:
    fn = getattr(pl_module, "sensitivity_loss", None)
    if callable(fn):
        loss = fn(batch)
    else:
        with _no_logging(pl_module):
            out = pl_module.training_step(batch, i)
        loss = out["loss"] if isinstance(out, Mapping) else out
    if not isinstance(loss, Tensor) or not loss.requires_grad:
        raise TvqError(f"BitAllocation: {type(pl_module).__name__} gave no differentiable loss; "
                       f"define sensitivity_loss(batch) -> Tensor on the module")
    return loss


@contextlib.contextmanager
def _no_logging(pl_module: pl.LightningModule):
    """``self.log`` / ``self.log_dict`` as no-ops (a training_step called outside the loop)."""
    pl_module.log = lambda *a, **k: None
    pl_module.log_dict = lambda *a, **k: None
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict
