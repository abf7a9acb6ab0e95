"""Set-up and fine-tuning of the dense demo: θ0 (the shipped scene encoder), one Lightning run per task.

Each task is one ``Trainer.fit`` of :class:`~tvq_lightning.modules.FineTuneModule` with the task's
dense task type (encoder + a fresh UNet decoder, one AdamW), whose Trainer carries one
:class:`~tvq_lightning.callbacks.QuantizeOnSave` per per-task scheme (FP32 and TVQ-INT4) writing the
*encoder's* task vector; the trained decoder is saved beside the stores as
``stores/heads/<task>.safetensors`` (decoders are never merged). TVQ-INT2, RTVQ B3O2 and BitDelta are
built afterwards from the FP32 store's exact task vectors (the classification demo's
:func:`~tvq_lightning.demo.finetune.build_joint_stores`).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ...callbacks.quantize_on_save import QuantizeOnSave
from ...data.scenes import OUT_CHANNELS, SceneTasks, load_scene_encoder
from ...models.dense import DenseEncoder, DenseHead
from ...modules.finetune import FineTuneModule
from ...store.st_stream import save_safetensors
from ..config import PER_TASK_SCHEMES, SCHEMES
from ..finetune import quiet_trainer
from .config import DenseDemoConfig


@dataclass
class DenseBench:
    """What every phase of the dense demo shares (duck-types the classification ``Bench`` where
    its helpers are reused: ``cfg``, ``tasks``, ``pretrained()``, ``pretrained_path``)."""

    cfg: DenseDemoConfig
    theta0: DenseEncoder
    pretrained_path: Path
    out: Path
    heads: dict[str, DenseHead] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.cfg.tasks)

    def encoder(self) -> DenseEncoder:
        return copy.deepcopy(self.theta0)

    def pretrained(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.theta0.state_dict().items()}

    def datamodule(self, train_task: str | None = None, batch_size: int | None = None) -> SceneTasks:
        c = self.cfg
        return SceneTasks(c.tasks, seed=c.seed, image_size=c.image_size, train_size=c.train_size, val_size=c.val_size,
                          test_size=c.test_size, batch_size=batch_size or c.finetune_batch, eval_batch_size=256,
                          train_task=train_task)

    def head_path(self, task: str) -> Path:
        return self.out / "stores" / "heads" / f"{task}.safetensors"


def prepare(cfg: DenseDemoConfig, out: Path) -> DenseBench:
    """θ0 (written to ``OUT/pretrained.safetensors``, the file every store is fingerprinted against)
    and the rendered splits (cached on disk by the scene generator)."""
    theta0 = load_scene_encoder(module=True)
    out.mkdir(parents=True, exist_ok=True)
    path = save_safetensors({k: v.detach().contiguous() for k, v in theta0.state_dict().items()},
                            out / "pretrained.safetensors")
    bench = DenseBench(cfg, theta0, path, out)
    dm = bench.datamodule()
    for split in ("train", "val", "test"):
        dm._data(split)   # render (or load) once, before the timed fine-tuning
    return bench


def new_head(bench: DenseBench, task: str) -> DenseHead:
    torch.manual_seed(bench.cfg.seed)
    return DenseHead(bench.theta0.out_channels, OUT_CHANNELS[task], decoder="unet",
                     decoder_channels=bench.cfg.decoder_channels)


def finetune_task(bench: DenseBench, task: str, stores: Mapping[str, Path]) -> None:
    """One ``Trainer.fit``: encoder + decoder on ``task``; the stores get its encoder task vector."""
    cfg = bench.cfg
    callbacks = [QuantizeOnSave(str(stores[s]), submodule="encoder", pretrained=str(bench.pretrained_path),
                                scheme=SCHEMES[s].scheme, bits=SCHEMES[s].bits, overwrite_task=True)
                 for s in PER_TASK_SCHEMES if s in stores]
    module = FineTuneModule(bench.encoder(), task, head=new_head(bench, task), lr=cfg.finetune_lr,
                            weight_decay=cfg.finetune_weight_decay, warmup_steps=cfg.warmup_steps, task_type=task)
    torch.manual_seed(cfg.seed)
    quiet_trainer(cfg.finetune_steps, callbacks=callbacks, gradient_clip_val=1.0).fit(module, bench.datamodule(task))
    module.head.save(bench.head_path(task))
    bench.heads[task] = DenseHead.load(bench.head_path(task)).eval()
