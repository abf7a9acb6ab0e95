"""Model Tinting / Tinting++ (SyMerge) on packed task vectors (docs/algorithms.md §5).

Layer-wise AdaMerging coefficients (one lambda per store key and task, clamped to [0, 1]) plus ONE
trainable task-specific layer per task, trained jointly with one Adam (lr 1e-2) on the unlabelled
test images of every task:

- ``tint="head"`` (default, as the released code): task t's head (a classification head, or a
  whole dense decoder), initialised from the given (zero-shot) head;
- ``tint="block:<name>"``: the encoder submodule ``<name>`` (e.g. ``blocks.1``, ``ln_post``) gets
  a per-task additive correction (zero-initialised) on top of its merged weights; heads stay frozen.

Loss (``crosspseudo``): the task type's pseudo-target loss of the merged+tinted outputs of task t
against the pseudo-target y_e of task t's expert (theta_0 + tau_t from the store, dequantized,
with task t's original head); classification: cross-entropy against the expert's argmax label
(:meth:`~tvq_lightning.tasks.TaskType.pseudo_targets`; dense types: maps). Expert targets and
confidences c_e are fixed per sample: they are computed ONCE, without gradients, at
``on_train_start`` (the first hook where the training loaders exist) and looked up by sample index
(each task's training batch is ``(indices, images)``). Tinting++ (``confidence_sampling=True``,
the default) keeps an element (a sample; a pixel for dense types) if y_e == y_m, or if y_e != y_m
and c_e >= c_m (:meth:`~tvq_lightning.tasks.TaskType.keep`); the loss is averaged over the kept
elements, and the optimizer step is skipped when none is kept.

Steps (manual optimization): ``step_mode="task"`` (default, as the released code) takes one Adam
step per task per training batch, tasks in a shuffled order, re-merging before each step;
``"joint"`` merges once and steps once on the sum of the tasks' losses. ``trainer.max_steps``
counts optimizer steps. Under DDP the kept count is summed over ranks before deciding to skip, so
every rank steps together, and each rank's loss is weighted by its share of the kept elements, so
a step equals one process's on the global batch. A checkpoint keeps the task-order generator, so a
resumed fit draws the same orders. DDP all-reduces the coefficients' gradients (used by every step); the
per-task layers are hidden from it (``_ddp_params_and_buffers_to_ignore``: with ``"task"`` only task
t's layer gets a gradient in its step) and their gradients are averaged over the ranks here, so
plain ``strategy: ddp`` works for both step modes.

The merge, the packed task vectors and the test evaluation are :class:`~.adamerging.AdaMerging`'s
(test: ``test/acc/<task>``, ``test/acc/avg`` for classification); ``heads_out`` saves the tinted heads as
``<task>.safetensors`` when fitting ends (usable as ``heads_dir`` of MergedEvaluation together
with ``coefficients_out``).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..adapt.merge_fn import base_tensors
from ..errors import TvqError
from ._experts import check_unlabelled_data, expert_outputs, split_batch
from .adamerging import AdaMerging


def _safe(name: str) -> str:
    return name.replace(".", "__")


class Tinting(AdaMerging):
    """Model Tinting (``confidence_sampling=False``) / Tinting++ (default); see the module docstring.

    Args:
        encoder, store, tasks, heads, heads_dir, pretrained: as :class:`~.adamerging.AdaMerging`.
        tint: ``"head"`` or ``"block:<encoder submodule name>"``: the per-task trainable layer.
        confidence_sampling: Tinting++'s sample selection (False: plain Model Tinting, every sample).
        granularity: ``"layer"`` (default) or ``"task"`` coefficients.
        plus: merge TIES-trimmed, sign-elected task vectors (the experts stay the raw ones).
        init, lr, clamp: initial coefficient, the one Adam's learning rate (1e-2), clamp range.
        step_mode: ``"task"`` (one step per task, shuffled order) or ``"joint"`` (one step per batch).
        seed: seeds the task order (identical on every rank).
        expert_batch_size: batch size of the one-off expert pass.
        coefficients_out: save the learned coefficients here when fitting ends.
        heads_out: save the (tinted) heads here (``<task>.safetensors``) when fitting ends.
        task_types, bn_stats, bn_batches: as :class:`~.adamerging.AdaMerging` (the experts keep their
            own statistics, θ0 + τ_t).
    """

    def __init__(self, encoder: nn.Module, store: str, tasks: list[str] | None = None,
                 heads: dict[str, nn.Module] | None = None, heads_dir: str | None = None, pretrained: str | None = None,
                 tint: str = "head", confidence_sampling: bool = True, granularity: str = "layer", plus: bool = False,
                 ties_k: float = 0.2, init: float = 0.3, lr: float = 1e-2, clamp: tuple[float, float] = (0.0, 1.0),
                 step_mode: Literal["task", "joint"] = "task", seed: int = 0, expert_batch_size: int = 128,
                 coefficients_out: str | None = None, heads_out: str | None = None,
                 task_types: str | dict[str, str] = "classification", bn_stats: str = "merged", bn_batches: int = 20):
        super().__init__(encoder, store, tasks, heads, heads_dir, pretrained, granularity=granularity, plus=plus,
                         ties_k=ties_k, init=init, lr=lr, clamp=clamp, coefficients_out=coefficients_out,
                         task_types=task_types, bn_stats=bn_stats, bn_batches=bn_batches)
        if step_mode not in ("task", "joint"):
            raise TvqError(f"step_mode={step_mode!r}: choose 'task' (one step per task) or 'joint' (one step per batch)")
        self.automatic_optimization = False
        # the experts' heads: the given ones, frozen; the tinted heads are copies of them
        self.expert_heads = copy.deepcopy(self.model.heads).requires_grad_(False)
        self.model.heads = copy.deepcopy(self.model.heads)
        self.block: str | None = None
        self.block_keys: list[str] = []
        self.deltas = nn.ModuleList()
        if tint == "head":
            self.model.heads.requires_grad_(True)
        elif tint.startswith("block:") and tint[6:]:
            self._init_block(tint[6:])
        else:
            raise TvqError(f"tint={tint!r}: choose 'head' or 'block:<encoder submodule>' (e.g. 'block:blocks.1')")
        # DDP syncs the coefficients; the per-task layers (unused in other tasks' steps) are synced in _step
        tinted = {id(p) for p in self.tint_parameters()}
        self._ddp_params_and_buffers_to_ignore = [*self._ddp_params_and_buffers_to_ignore,
                                                  *(n for n, p in self.named_parameters() if id(p) in tinted)]
        self.expert_targets: dict[str, Tensor] = {}   # per sample: labels (maps for dense types)
        self.expert_conf: dict[str, Tensor] = {}
        self.expert_passes = 0   # how many times the expert targets were computed (once per fit)
        self._order = torch.Generator().manual_seed(int(seed))

    def _init_block(self, name: str) -> None:
        enc = self.model.encoder
        try:
            sub = enc.get_submodule(name)
        except AttributeError:
            subs = [n for n, _ in enc.named_children()]
            raise TvqError(f"tint='block:{name}': the encoder has no submodule {name!r}; "
                           f"its children are: {', '.join(subs)}") from None
        self.block = name
        self.block_keys = [f"{name}.{p}" for p, _ in sub.named_parameters()]
        if not self.block_keys:
            raise TvqError(f"tint='block:{name}': that submodule has no parameters to tint")
        shapes = dict(enc.named_parameters())
        self.deltas = nn.ModuleList(nn.ParameterDict({_safe(k): nn.Parameter(torch.zeros_like(shapes[k]))
                                                      for k in self.block_keys}) for _ in self.tasks)

    # -- the tinted model ---------------------------------------------------------------------------
    def tint_parameters(self) -> list[nn.Parameter]:
        """The per-task trainable layers' parameters (heads, or the block corrections)."""
        return list(self.deltas.parameters()) if self.block else list(self.model.heads.parameters())

    def tinted_params(self, params: dict[str, Tensor], i: int) -> dict[str, Tensor]:
        """Task ``i``'s encoder weights: the merged ones, plus its block correction (block tint)."""
        if not self.block:
            return params
        base = base_tensors(self.model.encoder)
        out = dict(params)
        for k in self.block_keys:
            out[k] = params.get(k, base[k]) + self.deltas[i][_safe(k)]
        return out

    def tinted_outputs(self, images: Tensor, i: int, params: dict[str, Tensor]) -> Tensor:
        feats = functional_call(self.model.encoder, self.tinted_params(params, i), (images,))
        return self.model.heads[self.tasks[i]](feats)

    def _features(self, images: Tensor, task_index: int) -> Tensor:
        if self._eval_params is None:
            self._prepare_eval()
        return functional_call(self.model.encoder, self.tinted_params(self._eval_params, task_index), (images,))

    # -- expert targets (once) ------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            check_unlabelled_data(self.trainer, "Tinting")

    def on_train_start(self) -> None:
        if not self.expert_targets:
            self.compute_expert_targets()

    def _expert_pass(self, task: str, params: dict[str, Tensor], dataset) -> tuple[Tensor, Tensor]:
        """With the frozen given head (the tinted copy trains); AdaMerging's ``compute_expert_targets``
        fills the expert targets of every task."""
        head, tt = self.expert_heads[task], self.task_types[task]
        return expert_outputs(self.model.encoder, params, dataset, lambda z: tt.pseudo_targets(head(z)), self.device,
                              self.hparams.expert_batch_size)

    # -- training ---------------------------------------------------------------------------------------
    def task_loss(self, batch, i: int, params: dict[str, Tensor]) -> tuple[Tensor, int, int]:
        """``(loss, kept, seen)``: the pseudo-target loss against the expert's targets, averaged over
        the kept elements (``loss`` is a zero that still reaches every parameter when nothing is
        kept here); ``kept`` / ``seen`` count elements (samples; pixels for dense types)."""
        t = self.tasks[i]
        idx, images = split_batch(batch, t, "Tinting", self.task_types[t])
        return self.pseudo_target_loss(i, idx, self.tinted_outputs(images, i, params))

    def pseudo_target_loss(self, i: int, idx: Tensor, outputs: Tensor) -> tuple[Tensor, int, int]:
        """:meth:`task_loss` of task ``i``'s samples ``idx`` given their tinted ``outputs``."""
        t, tt = self.tasks[i], self.task_types[self.tasks[i]]
        idx = idx.to(self.expert_targets[t].device)
        y_e, c_e = self.expert_targets[t][idx], self.expert_conf[t][idx]
        if self.hparams.confidence_sampling:
            keep = tt.keep(y_e, c_e, outputs)
        else:
            keep = torch.ones_like(c_e, dtype=torch.bool)
        kept = int(keep.sum())
        loss = tt.pseudo_target_loss(outputs, y_e, keep) if kept else outputs.sum() * 0.0
        return loss, kept, int(keep.numel())

    def _kept_weights(self, kept: list[int]) -> list[float] | None:
        """The weight of each loss on this rank (one all-reduce), or None when no rank kept an element
        (the step is skipped). A loss is the mean over this rank's kept elements and DDP averages the
        ranks' gradients: weighted by ``world_size * kept / (kept summed over the ranks)`` the step is
        the mean over every rank's kept elements, as one process on the whole global batch (1.0 there)."""
        total = self.trainer.strategy.reduce(torch.tensor([float(k) for k in kept], device=self.device),
                                             reduce_op="sum").tolist()
        if not any(t > 0 for t in total):
            return None
        return [self.trainer.world_size * k / t if t > 0 else 0.0 for k, t in zip(kept, total)]

    def _step(self, loss: Tensor) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        self._sync_tint_grads()
        opt.step()

    def _sync_tint_grads(self) -> None:
        """Average the per-task layers' gradients over the ranks (one all-reduce; DDP ignores them).
        Every rank steps the same task, so the same gradients are set (the others are None)."""
        if self._trainer is None or self.trainer.world_size <= 1:
            return
        grads = [p.grad for p in self.tint_parameters() if p.grad is not None]
        if grads:
            flat = self.trainer.strategy.reduce(torch.cat([g.reshape(-1) for g in grads]), reduce_op="mean")
            for g, v in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(v.view_as(g))

    def training_step(self, batch, batch_idx):
        order = torch.randperm(len(self.tasks), generator=self._order).tolist()
        losses, kept_all, seen_all, skipped = [], 0, 0, 0
        n = sum(len(split_batch(batch, t, "Tinting", self.task_types[t])[0]) for t in self.tasks) // len(self.tasks)
        if self.hparams.step_mode == "joint":
            parts = self._joint_losses(batch, order)
            kept_all, seen_all = sum(p[1] for p in parts), sum(p[2] for p in parts)
            losses = [float(p[0].detach()) for p in parts if p[1]]
            weights = self._kept_weights([p[1] for p in parts])
            if weights is not None:
                self._step(sum(p[0] * w for p, w in zip(parts, weights)))
            else:
                skipped += 1
        else:
            for i in order:
                loss, kept, seen = self.task_loss(batch, i, self.merged_params())   # one merge per step
                kept_all, seen_all = kept_all + kept, seen_all + seen
                weights = self._kept_weights([kept])
                if weights is not None:
                    self._step(loss * weights[0])
                    if kept:
                        losses.append(float(loss.detach()))
                else:
                    skipped += 1
        if losses:
            self.log("train/ce", sum(losses) / len(losses), prog_bar=True, batch_size=n)
        self.log("train/kept", kept_all / max(1, seen_all), prog_bar=True, batch_size=n)
        self.log("train/skipped_steps", float(skipped), reduce_fx="sum", batch_size=n)

    def _joint_losses(self, batch, order: list[int]) -> list[tuple[Tensor, int, int]]:
        """Every task's :meth:`task_loss` under one merge. With head tints all tasks share the
        encoder, so their images take one pass (AdaMerging's ``task_features``: block-streamed with
        ``checkpoint_tasks``); a block tint gives each task its own encoder, hence its own forward."""
        if self.block:
            params = self.merged_params()
            return [self.task_loss(batch, i, params) for i in order]
        parts = [split_batch(batch, t, "Tinting", self.task_types[t]) for t in self.tasks]
        feats = self.task_features([images for _, images in parts])
        return [self.pseudo_target_loss(i, parts[i][0], self.model.heads[self.tasks[i]](feats[i])) for i in order]

    def configure_optimizers(self):
        return torch.optim.Adam([self.coefficients, *self.tint_parameters()], lr=self.hparams.lr)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tinting_task_order"] = self._order.get_state()   # a resumed fit draws the same task orders

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "tinting_task_order" in checkpoint:
            self._order.set_state(checkpoint["tinting_task_order"])

    def on_fit_end(self) -> None:
        super().on_fit_end()
        if self.hparams.heads_out and self.trainer.is_global_zero:
            self.save_heads(self.hparams.heads_out)

    def save_heads(self, out_dir: str | Path) -> Path:
        """Write every task's (tinted) head as ``<out_dir>/<task>.safetensors``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for t in self.tasks:
            self.task_types[t].save_head(self.model.heads[t], out / f"{t}.safetensors")
        return out
