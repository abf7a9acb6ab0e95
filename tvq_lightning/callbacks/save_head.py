"""Save a fine-tuning run's classification head as ``<out_dir>/<task>.safetensors``.

Task vectors never include the heads, yet every multi-task module (MergedEvaluation, AdaMerging,
Tinting, Surgery) needs one head per task: they read them from ``heads_dir``, one
``<task>.safetensors`` per task (written by the module's task type,
:meth:`~tvq_lightning.tasks.TaskType.save_head`; classification:
:meth:`~tvq_lightning.models.ClassificationHead.save`).
:class:`SaveHead` writes that file at the end of fitting (global rank zero), so a fine-tuning run
with :class:`~.quantize_on_save.QuantizeOnSave` leaves behind everything a merge needs: the
store, theta_0 and the heads. With :class:`~tvq_lightning.modules.finetune.FineTuneModule` the
head is the frozen linear probe (or the given head).
"""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from ..errors import TvqError
from ..store.sources import check_task_name


class SaveHead(Callback):
    """Write ``pl_module.<attribute>`` to ``<out_dir>/<task>.safetensors`` when fitting ends.

    Args:
        out_dir: the heads directory (a ``heads_dir`` of the multi-task modules).
        task: the file's name; default ``pl_module.task``.
        attribute: the head's attribute on the module (a ``ClassificationHead``).
    """

    def __init__(self, out_dir: str, task: str | None = None, attribute: str = "head") -> None:
        super().__init__()
        self.out_dir = Path(out_dir)
        self.task = task
        self.attribute = attribute
        self.path: Path | None = None
        """The file written last, or None."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.save(pl_module)

    def save(self, pl_module: pl.LightningModule) -> Path:
        """Write the head now; returns the file's path."""
        task = self.task or getattr(pl_module, "task", None)
        if not isinstance(task, str):
            raise TvqError(f"SaveHead: {type(pl_module).__name__} has no 'task' name; pass task: NAME")
        head = getattr(pl_module, self.attribute, None)
        task_type = getattr(pl_module, "task_type", None)
        if head is None or (task_type is None and not hasattr(head, "save")):
            raise TvqError(f"SaveHead: {type(pl_module).__name__}.{self.attribute} is not a ClassificationHead; "
                           "set attribute to the module's head")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / f"{check_task_name(task)}.safetensors"
        if task_type is not None and hasattr(task_type, "save_head"):
            task_type.save_head(head, self.path)
        else:
            head.save(self.path)
        return self.path
