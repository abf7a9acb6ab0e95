"""Fine-tuning every task through Lightning, with the task vectors written by ``QuantizeOnSave``.

Each task is one ``Trainer.fit`` of :class:`~tvq_lightning.modules.FineTuneModule` (the zero-shot
head frozen, AdamW, cosine schedule with warm-up, gradient clipping at 1) whose Trainer carries one
:class:`~tvq_lightning.callbacks.QuantizeOnSave` per scheme of :data:`~.config.PER_TASK_SCHEMES` (FP32
and TVQ-INT4): the fine-tuned weights are never written, only the stores. The other stores are
built afterwards from the FP32 store's exact task vectors with
:func:`~tvq_lightning.store.quantize_to_store` (what ``tvq quantize`` runs), all tasks at once (RTVQ's
shared base and the budget's joint allocation need them together).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor

from ..callbacks.quantize_on_save import QuantizeOnSave
from ..data.multitask import TensorTasks
from ..modules.finetune import FineTuneModule
from ..quant.policy import is_quantized
from ..quant.sensitivity import accumulate_squared_gradients
from ..store.layout import StoreConfig
from ..store.reader import TaskVectorStore
from ..store.writer import quantize_to_store
from .bench import Bench
from .config import PER_TASK_SCHEMES, SCHEMES
from .evaluate import TASK_TYPE


class FinetunedFromStore(Mapping):
    """θ0 + τ_t as a lazy state dict, from an exact (FP32) store."""

    def __init__(self, store: TaskVectorStore, task: str, pretrained: Mapping[str, Tensor]):
        self.store, self.task, self.pre = store, task, pretrained
        self._keys = set(store.keys)

    def __getitem__(self, key: str) -> Tensor:
        p = self.pre[key]
        return p + self.store.task_vector(self.task, key).to(p.dtype) if key in self._keys else p

    def __iter__(self) -> Iterator[str]:
        return iter(self.pre)

    def __len__(self) -> int:
        return len(self.pre)


def quiet_trainer(max_steps: int, **kwargs) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, bars or summaries (the demo prints its own progress)."""
    opts = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    opts.update(kwargs)
    return pl.Trainer(max_steps=max_steps, **opts)


def finetune_task(bench: Bench, task: str, stores: Mapping[str, Path]) -> None:
    cfg = bench.cfg
    callbacks = [QuantizeOnSave(str(stores[s]), submodule="encoder", pretrained=str(bench.pretrained_path),
                                scheme=SCHEMES[s].scheme, bits=SCHEMES[s].bits, overwrite_task=True)
                 for s in PER_TASK_SCHEMES if s in stores]
    module = FineTuneModule(bench.top(), task, head=bench.heads[task], num_classes=bench.num_classes[task],
                            lr=cfg.finetune_lr, weight_decay=cfg.finetune_weight_decay)
    dm = TensorTasks(bench.data, bench.num_classes, batch_size=cfg.finetune_batch, train_task=task)
    torch.manual_seed(cfg.seed)
    quiet_trainer(cfg.finetune_steps, callbacks=callbacks, gradient_clip_val=1.0).fit(module, dm)


def task_sensitivities(bench: Bench, config: StoreConfig) -> dict[str, float]:
    """Per quantized key, the mean squared gradient of each task's fine-tuning loss at θ0 (its
    zero-shot head, its first ``cfg.sensitivity_batches`` training batches), averaged over the
    tasks: what :class:`~tvq_lightning.callbacks.BitAllocation` estimates at the start of a run."""
    cfg, top = bench.cfg, bench.top().eval()
    named = [(k, p) for k, p in top.named_parameters() if is_quantized(k, p.shape, p.dtype, config.policy)]
    params = [p.requires_grad_(True) for _, p in named]
    total = torch.zeros(len(params), dtype=torch.float64)
    for t in bench.tasks:
        x, y = bench.data[t]["train"]
        batches = zip(x.split(cfg.finetune_batch), y.split(cfg.finetune_batch))
        head = bench.heads[t]
        sums, count = accumulate_squared_gradients(lambda i, b, head=head: TASK_TYPE.loss(head(top(b[0])), b[1]),
                                                   params, batches, cfg.sensitivity_batches)
        total += sums / max(count, 1)
    return {k: float(v) / len(bench.tasks) for (k, _), v in zip(named, total)}


def build_joint_stores(bench: Bench, stores: Mapping[str, Path]) -> None:
    """The stores that need every task at once, from the FP32 store (the budget store's bits
    weighted by :func:`task_sensitivities` unless ``cfg.budget_sensitivity`` is ``uniform``)."""
    exact = TaskVectorStore(stores["fp32"])
    pre = bench.pretrained()
    for name, path in stores.items():
        if name in PER_TASK_SCHEMES:
            continue
        config = SCHEMES[name]
        weights = None
        if config.budget is not None and bench.cfg.budget_sensitivity == "grad2":
            weights = task_sensitivities(bench, config)
        fts = {t: FinetunedFromStore(exact, t, pre) for t in bench.tasks}
        quantize_to_store(bench.pretrained_path, fts, path, config=config, sensitivity=weights, progress=False)
