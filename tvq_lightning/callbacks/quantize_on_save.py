"""Write the quantized task vector of a fine-tuning run into a store, from any Trainer.

:class:`QuantizeOnSave` takes the task vector ``tau = theta - theta_0`` of one sub-module of the
LightningModule (``submodule``, default ``encoder``) and quantizes it into ``store`` under the
task's name: a new store is created, an existing one gets the task added (so runs for different
tasks can share one store). The fp32 fine-tuned weights are never the stored artifact; Lightning's
own checkpointing may be turned off.

``theta_0`` is the file ``pretrained`` (with ``pretrained_prefix`` selecting the sub-module's keys)
or, by default, the sub-module's weights as they are at ``setup("fit")``, copied to the CPU. That
is before a checkpoint is restored, so a resumed run still gets the starting weights. A store is
tied to its ``theta_0`` by fingerprint: to merge it later the same weights must be at hand, so
either pass ``pretrained`` or let ``save_pretrained: PATH`` write the captured weights once as
safetensors (an existing file must hold the same weights).

Hooks: ``setup`` (capture theta_0, check ``pretrained``), ``on_fit_start`` (the task must not
already be in the store unless ``overwrite_task`` or the run resumes from a checkpoint),
``on_train_end`` (``on: end`` or
``both``) and ``on_save_checkpoint`` (``on: checkpoint`` or ``both``). Every rank meets a barrier,
global rank zero writes, then a second barrier holds the others until the store is complete.
Several runs may add tasks to one store one after another, not at the same moment (the last
writer of ``layout.json`` would win). In YAML, quote the key: ``"on": checkpoint`` (YAML 1.1
reads a bare ``on`` as ``true``).

Re-saving a task replaces it: the task's first save in a run adds it; later saves (every
checkpoint) replace it, as does a first save with ``overwrite_task: true`` or in a resumed run. If the store holds
only that task it is rebuilt (``overwrite``, staged and swapped atomically); otherwise the new
version is added under a temporary name, then ``layout.json`` is atomically rewritten to point
the task at the new file, and the old file is deleted. In an RTVQ store, a replaced task's offset
is taken against the stored (frozen) base; the second task added to a store whose base was built
from one task recomputes the base over both (a one-task base is that task's own vector).

With a ``BitAllocation`` callback in the same Trainer (any callback with a ``tvq_allocation``
method), the per-key widths are chosen from this run's task vector before a new store is
written, and recorded with the sensitivities in the layout's ``allocation`` entry; tasks added to
an existing store take the store's recorded widths. The allocation is also left at
``pl_module._tvq_allocation``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from ..errors import TvqError
from ..store.checkpoints import load_state_dict
from ..store.fingerprint import fingerprint_state_dict
from ..store.io import atomic_write_json
from ..store.layout import LAYOUT_FILE, StoreConfig, read_layout
from ..quant.schemes import DEFAULT_SCHEME
from ..store.sources import check_task_name
from ..store.writer import quantize_to_store


def submodule_of(pl_module: nn.Module, path: str) -> nn.Module:
    """``pl_module.<path>`` for a dotted attribute path (``""`` is the module itself)."""
    module = pl_module
    for part in [p for p in path.split(".") if p]:
        module = getattr(module, part, None)
        if module is None:
            raise TvqError(f"{type(pl_module).__name__} has no sub-module {path!r}; set submodule to an "
                           f"attribute path such as 'encoder' or 'model.visual'")
    if not isinstance(module, nn.Module):
        raise TvqError(f"{type(pl_module).__name__}.{path} is a {type(module).__name__}, not an nn.Module")
    return module


def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``module``'s state dict."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


class QuantizeOnSave(Callback):
    """Quantize the run's task vector into ``store`` (see the module docstring).

    Args:
        store: the store directory (created, or added to).
        task: the task's name in the store; default ``pl_module.task``.
        submodule: attribute path of the module whose task vector is stored.
        pretrained: theta_0 as a file; default: the sub-module's weights at ``setup("fit")``.
        pretrained_prefix: with ``pretrained``, the key prefix of the sub-module in that file.
        save_pretrained: write the captured theta_0 here as safetensors (once).
        scheme, bits, base_bits, offset_bits, granularity, group_size, policy, error_correction:
            the store's settings (:class:`~tvq_lightning.store.StoreConfig`; ``scheme`` is any
            registered scheme, ``tvq_lightning.quant.list_schemes()``); an existing store must
            have the same ones.
        on: write at the end of training, at every checkpoint save, or both.
        overwrite_task: replace the task if the store already holds it before this run.
    """

    def __init__(self, store: str, task: str | None = None, submodule: str = "encoder",
                 pretrained: str | None = None, pretrained_prefix: str | None = None,
                 save_pretrained: str | None = None,
                 scheme: str = DEFAULT_SCHEME, bits: int = 4, base_bits: int = 3,
                 offset_bits: int = 2, granularity: Literal["tensor", "channel", "group"] = "tensor",
                 group_size: int = 128, policy: str = "rank", error_correction: bool = True,
                 on: Literal["end", "checkpoint", "both"] = "end", overwrite_task: bool = False):
        super().__init__()
        if on not in ("end", "checkpoint", "both"):
            raise TvqError(f"QuantizeOnSave on={on!r}: choose 'end', 'checkpoint' or 'both'")
        if pretrained is not None and save_pretrained is not None:
            raise TvqError("QuantizeOnSave: save_pretrained writes captured weights; with pretrained given, drop it")
        self.store, self.task, self.submodule = Path(store), task, submodule
        self.pretrained, self.pretrained_prefix, self.save_pretrained = pretrained, pretrained_prefix, save_pretrained
        self.config = StoreConfig(scheme=scheme, bits=bits, base_bits=base_bits, offset_bits=offset_bits,
                                  granularity=granularity, group_size=group_size, policy=policy,
                                  error_correction=error_correction)
        self.on, self.overwrite_task = on, overwrite_task
        self._pre: dict[str, torch.Tensor] | None = None
        self._written = self._resumed = False

    # -- state --------------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(store=str(self.store), task=self.task, submodule=self.submodule)

    def state_dict(self) -> dict:
        # a checkpoint saved with on=checkpoint|both implies the task was written at that save
        return {"written": self._written or self.on != "end"}

    def load_state_dict(self, state_dict: dict) -> None:
        self._written = bool(state_dict.get("written", False))

    # -- hooks ----------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._task = check_task_name(self.task or getattr(pl_module, "task", None) or _no_task(pl_module))
        module = submodule_of(pl_module, self.submodule)
        if self.pretrained is None:
            if trainer.is_global_zero:  # only rank zero writes
                self._pre = cpu_state_dict(module)
        elif not Path(self.pretrained).is_file():
            raise TvqError(f"QuantizeOnSave: pretrained file {self.pretrained} does not exist")
        if self.on == "checkpoint" and not trainer.checkpoint_callbacks:
            rank_zero_warn("QuantizeOnSave(on='checkpoint') but the Trainer saves no checkpoints: nothing will be "
                           "written; use on='end' or enable checkpointing")
        if self.save_pretrained is not None and trainer.is_global_zero:
            _save_pretrained(self._pre, Path(self.save_pretrained))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after a checkpoint is restored: a resumed run continues the run that writes this task
        self._resumed = trainer.ckpt_path is not None
        if not self._may_replace() and (self.store / LAYOUT_FILE).is_file():
            if self._task in read_layout(self.store).tasks:  # fail before training, not after it
                raise TvqError(f"task {self._task!r} is already in store {self.store}; set overwrite_task: true "
                               f"to replace it, or choose another task name or store")

    def _may_replace(self) -> bool:
        return self.overwrite_task or self._written or self._resumed

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on in ("end", "both"):
            self.write(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self.on in ("checkpoint", "both"):
            self.write(trainer, pl_module)

    # -- writing --------------------------------------------------------------------------------------
    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Barrier, rank zero quantizes the current task vector into the store, barrier."""
        trainer.strategy.barrier("QuantizeOnSave.write")
        if trainer.is_global_zero:
            self._write(trainer, pl_module)
        trainer.strategy.barrier("QuantizeOnSave.written")

    def _pretrained(self) -> dict[str, torch.Tensor]:
        if self._pre is not None:
            return self._pre
        return load_state_dict(self.pretrained, prefix=self.pretrained_prefix)

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        task, store = self._task, self.store
        ft = cpu_state_dict(submodule_of(pl_module, self.submodule))
        pre = self._pretrained()
        tasks = list(read_layout(store).tasks) if (store / LAYOUT_FILE).is_file() else None
        if tasks is not None and task in tasks and not self._may_replace():
            raise TvqError(f"task {task!r} is already in store {store}; set overwrite_task: true to replace it")
        fresh = tasks is None or tasks == [task]  # a new store, or one that only this task would fill
        cfg, allocation, sensitivity = self.config, None, None
        allocator = next((cb for cb in trainer.callbacks if callable(getattr(cb, "tvq_allocation", None))), None)
        if allocator is not None and fresh:
            allocation, sensitivity = allocator.tvq_allocation(pre, ft, cfg)
            cfg = replace(cfg, budget=allocation.budget, per_tensor_bits=allocation.per_tensor)
            pl_module._tvq_allocation = allocation
            rank_zero_info(f"QuantizeOnSave: task {task!r} stored with {allocation.describe()}")
        elif tasks is not None:
            cfg = self._store_config(cfg)
            if allocator is not None:
                rank_zero_info(f"QuantizeOnSave: store {store} exists; task {task!r} takes its recorded widths")
        if fresh:
            quantize_to_store(pre, {task: ft}, store, cfg, overwrite=tasks is not None, allocation=allocation,
                              sensitivity=sensitivity, progress=False)
        elif task in tasks:
            self._replace(pre, ft, cfg)
        else:
            quantize_to_store(pre, {task: ft}, store, cfg, progress=False)
        self._written = True

    def _store_config(self, cfg: StoreConfig) -> StoreConfig:
        """The existing store's config, if it matches ours up to the bit budget."""
        stored = read_layout(self.store).config

        def plain(c: StoreConfig) -> StoreConfig:
            return replace(c, budget=None, per_tensor_bits=False)

        if plain(stored) != plain(cfg):
            raise TvqError(f"store {self.store} holds {stored.label} task vectors ({plain(stored)}) but QuantizeOnSave "
                           f"is set to {cfg.label} ({plain(cfg)}); use the store's settings or another store")
        return stored

    def _replace(self, pre: dict[str, torch.Tensor], ft: dict[str, torch.Tensor], cfg: StoreConfig) -> None:
        """Add the new version under a temporary name, then point the task at it atomically."""
        task, store = self._task, self.store
        tmp = f"{task}.replacing"
        _drop_task(store, tmp)  # a leftover of an interrupted replacement
        quantize_to_store(pre, {tmp: ft}, store, cfg, progress=False)
        layout = read_layout(store)
        new, old = layout.tasks[tmp], layout.tasks[task]
        n = 1
        while (store / f"tasks/{task}.g{layout.generation}.r{n}.safetensors").exists() or \
                f"tasks/{task}.g{layout.generation}.r{n}.safetensors" == old.file:
            n += 1
        final = f"tasks/{task}.g{layout.generation}.r{n}.safetensors"
        try:
            os.link(store / new.file, store / final)
        except OSError:
            shutil.copyfile(store / new.file, store / final)
        entry = replace(new, file=final, source=f"<{task} state dict>")
        tasks = {name: (entry if name == task else info) for name, info in layout.tasks.items() if name != tmp}
        atomic_write_json(store / LAYOUT_FILE, layout.with_(tasks=tasks).to_json())
        for rel in (new.file, old.file):
            with contextlib.suppress(OSError):
                (store / rel).unlink()


def _drop_task(store: Path, name: str) -> None:
    layout = read_layout(store)
    if name in layout.tasks:
        info = layout.tasks[name]
        tasks = {n: i for n, i in layout.tasks.items() if n != name}
        atomic_write_json(store / LAYOUT_FILE, layout.with_(tasks=tasks).to_json())
        with contextlib.suppress(OSError):
            (store / info.file).unlink()


def _no_task(pl_module: nn.Module) -> str:
    raise TvqError(f"QuantizeOnSave needs a task name: set task, or give {type(pl_module).__name__} a 'task' attribute")


def _save_pretrained(sd: dict[str, torch.Tensor], path: Path) -> None:
    """Write theta_0 as safetensors once; an existing file must hold the same weights."""
    if path.exists():
        if fingerprint_state_dict(load_state_dict(path)) != fingerprint_state_dict(sd):
            raise TvqError(f"save_pretrained file {path} exists and holds other weights than this run's starting "
                           f"weights; choose another path")
        return
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(tmp))
    os.replace(tmp, path)
