"""Fine-tuning one task's encoder with its head frozen (the task-vector protocol).

Defaults follow the task_vectors recipe (Ilharco et al.): AdamW with lr 1e-5 and weight decay
0.1 on every trainable encoder parameter, a linear warm-up over 500 steps, then a cosine decay to
0 at the last step. A short run warms up over ``min(warmup_steps, 10 % of its steps)`` instead.
The recipe also clips gradients at norm 1: give the Trainer ``gradient_clip_val: 1.0``
(``--trainer.gradient_clip_val 1.0``).

What a head, a loss and a metric are is the task's type (``task_type``, a registered
:class:`~tvq_lightning.tasks.TaskType`; ``classification`` by default). The classification head
is frozen so that the task vector ``tau = theta - theta_start`` of the encoder carries the whole
task; it is a :class:`~tvq_lightning.models.ClassificationHead` given directly, loaded from
``head_path``, or, when neither is given, built by the task type
(:meth:`~tvq_lightning.tasks.TaskType.build_head`; classification: a linear probe fitted on the
frozen starting encoder's features of the task's training data,
:func:`~tvq_lightning.models.probe.fit_linear_probe`) when fitting starts (``on_fit_start``, on
the device). Types whose heads start untrained (dense decoders: ``trains_head``) build the head in
``setup`` and train it with the encoder; it is still never part of the task vector. The head is
saved inside every Lightning checkpoint (``head.*`` keys) and rebuilt from it on load. ``start_fingerprint`` is the fingerprint of the encoder's weights at
construction (kept through checkpoints): the fingerprint of the ``theta_start`` that a store
built from this run (``QuantizeOnSave``) belongs to.

Logged: ``train/loss`` and the task type's batch metrics (``train/acc``) per step; ``val/loss``,
``val/acc`` (``test/...``) per epoch. A multi-task datamodule gives one validation loader per
task; only this task's loader is evaluated (the others are iterated and skipped: limit them with
``limit_val_batches`` or a single-task datamodule). ``Trainer.predict`` returns
``{"task": task, "preds": ...}`` per batch of this task's loader (None for other tasks'). The
batch hook for other code is :meth:`FineTuneModule.sensitivity_loss`.
"""
from __future__ import annotations

import math
import re

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from ..errors import TvqError
from ..store.fingerprint import fingerprint_state_dict
from ..tasks import create_task_type


class FineTuneModule(pl.LightningModule):
    """``outputs = head(encoder(images))``; only (the ``trainable`` part of) the encoder learns.

    Args:
        encoder: the image encoder (a LightningCLI ``class_path``, e.g.
            ``tvq_lightning.models.encoders.open_clip_encoder``).
        task: the task's name; the datamodule's ``train_task`` must be this task.
        head: a frozen head, or None.
        head_path: a head saved with the task type's ``save_head`` (instead of ``head``).
        num_classes: the task's class count (output count); checked against the head and the datamodule.
        lr, weight_decay: AdamW settings (task_vectors: 1e-5 and 0.1).
        warmup_steps: linear warm-up steps before the cosine decay (capped at 10 % of the run).
        trainable: ``"all"``, or a regular expression searched in the encoder's parameter names:
            only matching parameters are trained (e.g. ``"transformer.resblocks.1[01]\\."`` for
            the top blocks of a ViT-B); the others keep their starting values, so their task
            vector is exactly zero and is not stored.
        probe_steps: Adam steps of the linear probe fitted when no head is given.
        task_type: the task's type (a registered name: ``classification``, ...).
    """

    def __init__(self, encoder: nn.Module, task: str, head: nn.Module | None = None,
                 head_path: str | None = None, num_classes: int | None = None, lr: float = 1e-5,
                 weight_decay: float = 0.1, warmup_steps: int = 500, trainable: str = "all",
                 probe_steps: int = 300, task_type: str = "classification"):
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "head"])
        if head is not None and head_path is not None:
            raise TvqError("give either head or head_path to FineTuneModule, not both")
        self.encoder = encoder
        self.task = task
        self.task_type = create_task_type(task_type)
        self.num_classes = num_classes
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.probe_steps = probe_steps
        self.head: nn.Module | None = None
        if head_path is not None:
            head = self.task_type.load_head(head_path)
        if head is not None:
            self._set_head(head)
        self._check_head_classes(num_classes, "num_classes")
        self.trainable = trainable
        self._apply_trainable(trainable)
        self.start_fingerprint = fingerprint_state_dict(
            {k: v.detach().cpu() for k, v in encoder.state_dict().items()})

    # -- head and trainable parameters --------------------------------------------------------
    def _set_head(self, head: nn.Module) -> None:
        head.requires_grad_(self.task_type.trains_head)
        self.head = head

    def _check_head_classes(self, n: int | None, source: str) -> None:
        if self.head is not None:
            self.task_type.check_head(self.task, self.head, n, source)

    def _apply_trainable(self, trainable: str) -> None:
        names = [n for n, _ in self.encoder.named_parameters()]
        if trainable == "all":
            keep = set(names)
        else:
            try:
                pattern = re.compile(trainable)
            except re.error as e:
                raise TvqError(f"trainable={trainable!r} is not a regular expression ({e}); "
                               f"give 'all' or a regex") from None
            keep = {n for n in names if pattern.search(n)}
            if not keep:
                raise TvqError(f"trainable={trainable!r} matches no encoder parameter; names look like "
                               f"{', '.join(names[:3])}, ... ({len(names)} in all)")
        for n, p in self.encoder.named_parameters():
            p.requires_grad_(n in keep)

    # -- Lightning hooks --------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        multitask = dm is not None and getattr(dm, "tasks", None) is not None
        if multitask:
            tasks = list(dm.tasks)
            if self.task not in tasks:
                raise TvqError(f"task {self.task!r} is not in the datamodule's tasks ({', '.join(tasks)}); "
                               f"set model.task to one of them")
            n = self.task_type.data_outputs(dm, self.task)
            if self.num_classes is not None and n is not None and self.num_classes != n:
                raise TvqError(f"num_classes={self.num_classes} but the datamodule's task {self.task!r} has {n} "
                               f"classes; drop num_classes or fix it")
            self._check_head_classes(n, f"the datamodule's task {self.task!r}")
            self.num_classes = n if n is not None else self.num_classes
            if stage == "fit" and getattr(dm, "train_task", self.task) != self.task:
                raise TvqError(f"fine-tuning task {self.task!r} but the datamodule's train_task is "
                               f"{getattr(dm, 'train_task', None)!r}; set data.train_task: {self.task}")
        if self.head is None and not (stage == "fit" and multitask):
            raise TvqError(f"FineTuneModule for task {self.task!r} has no head: pass head_path (a saved "
                           f"ClassificationHead), or fit with a datamodule so that a linear probe is fitted")
        if self.head is None and self.task_type.trains_head:   # trained with the encoder: in the optimizer
            self._build_head()

    def _build_head(self) -> None:
        head = self.task_type.build_head(self.encoder, self.trainer.datamodule.train_dataloader(), self.num_classes,
                                         steps=self.probe_steps)
        self._set_head(head.to(self.device))

    def on_fit_start(self) -> None:
        """Without a head (and not resumed from a checkpoint holding one): build it now (classification:
        fit the linear probe, on the device, from the starting encoder and the datamodule's training data)."""
        if self.head is None:
            self._build_head()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tvq_finetune"] = {"task": self.task, "start_fingerprint": self.start_fingerprint,
                                      "head_config": None if self.head is None else self.task_type.head_config(self.head)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        info = checkpoint.get("tvq_finetune", {})
        self.start_fingerprint = info.get("start_fingerprint", self.start_fingerprint)
        state = {k[len("head."):]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("head.")}
        if self.head is None and state:
            config = info.get("head_config") or {"normalize": info.get("head_normalize", True)}
            head = self.task_type.head_from_state(state, config)
            if head is not None:
                self._set_head(head)

    # -- steps ------------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.encoder(images))

    def _loss_metrics(self, batch) -> tuple[Tensor, dict[str, Tensor], int]:
        tt = self.task_type
        outputs, targets = self(tt.inputs(batch)), tt.targets(batch)
        return tt.loss(outputs, targets), tt.batch_metrics(outputs, targets), tt.batch_size(batch)

    def sensitivity_loss(self, batch) -> Tensor:
        """The training loss of ``batch`` without logging (used by the bit-allocation callback)."""
        return self._loss_metrics(batch)[0]

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss, metrics, n = self._loss_metrics(batch)
        self.log_dict({"train/loss": loss, **{f"train/{k}": v for k, v in metrics.items()}}, prog_bar=True, batch_size=n)
        return loss

    def _is_own_task(self, dataloader_idx: int) -> bool:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        tasks = getattr(dm, "tasks", None)
        return tasks is None or (dataloader_idx < len(tasks) and tasks[dataloader_idx] == self.task)

    def _eval_step(self, batch, dataloader_idx: int, split: str) -> None:
        # a multi-task datamodule gives one loader per task: only this task's head applies
        if not self._is_own_task(dataloader_idx):
            return
        loss, metrics, n = self._loss_metrics(batch)
        self.log(f"{split}/loss", loss, batch_size=n, add_dataloader_idx=False)
        for k, v in metrics.items():
            self.log(f"{split}/{k}", v, prog_bar=True, batch_size=n, add_dataloader_idx=False)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "val")

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict | None:
        """``{"task": task, "preds": ...}`` (the task type's prediction) on this task's loader; None on others'."""
        if not self._is_own_task(dataloader_idx):
            return None
        return {"task": self.task, "preds": self.task_type.predict(self(self.task_type.inputs(batch)))}

    # -- optimisation -----------------------------------------------------------------------------
    def _adamw_impl(self, params: list[Tensor]) -> dict[str, bool]:
        """AdamW's fused kernel (~3x faster than ``foreach`` on CPU) where torch has it for every
        parameter; not under mixed precision, where Lightning cannot clip the gradients of an
        optimizer that unscales them itself."""
        precision = str(getattr(self._trainer, "precision", "32-true")) if self._trainer is not None else "32-true"
        fused = "mixed" not in precision and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return {"fused": True} if fused else {"foreach": True}

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]   # the encoder's (and a trained head's)
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, **self._adamw_impl(params))
        total = self.trainer.estimated_stepping_batches
        total = int(total) if math.isfinite(total) and total > 0 else None
        warm = self.warmup_steps if total is None else min(self.warmup_steps, int(0.1 * total))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(warm, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def cosine_with_warmup(warmup: int, total: int | None):
    """lr factor per step: ``(s + 1) / warmup`` while warming up, then ``cos`` from 1 to 0 at ``total``
    (the task_vectors ``cosine_lr``); constant 1 after warm-up when ``total`` is unknown."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if total is None:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor
