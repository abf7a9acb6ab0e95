"""Representation Surgery on top of a fixed merge (docs/algorithms.md §5).

The merged encoder is fixed (any source :class:`~.evaluate.MergedEvaluation` takes: a merged state
dict file, a store + registered ``method``, or AdaMerging ``coefficients`` + store). Per task t a
small module edits the merged representation z of the encoder output::

    z' = z - U_t ReLU(D_t z)        D_t: d -> rank (16), U_t: rank -> d, U_t zero-initialised

so training starts from the merged model exactly. The edit applies at every position of the
encoder output (a ``(B, D)`` vector; each pixel's channels of a ``(B, C, H, W)`` map:
:meth:`~tvq_lightning.tasks.TaskType.map_features`). The loss is sum_t of the task type's feature
distance (mean |z'_t - z_e,t|) to the features of task t's expert (theta_0 + tau_t, dequantized
from the store) on the same unlabelled test images; Adam, lr 1e-3. Expert features are fixed per
sample: computed ONCE, without gradients, at ``on_train_start`` (the first hook where the
training loaders exist) and looked up by index (each task's training batch is
``(indices, images)``). Only the surgery modules are trainable. Test / validation metrics are
MergedEvaluation's, on the edited features: ``test/acc/<task>``, ``test/acc/avg`` for classification.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import TvqError
from ..store.reader import TaskVectorStore
from ._experts import check_unlabelled_data, expert_outputs, expert_params, indexed_datasets, split_batch
from ._multitask_eval import prepare_encoder
from .evaluate import MergedEvaluation


class SurgeryAdapter(nn.Module):
    """``z - up(relu(down(z)))`` with ``down: dim -> rank`` and ``up: rank -> dim`` (zero-initialised)."""

    def __init__(self, dim: int, rank: int = 16):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, z: Tensor) -> Tensor:
        return z - self.up(F.relu(self.down(z)))


class Surgery(MergedEvaluation):
    """Representation Surgery: per-task feature correction toward the experts (see the module docstring).

    Args:
        encoder: the encoder architecture holding theta_0 (or pass ``pretrained``).
        store: the task-vector store the experts come from (theta_0 + tau_t); also the merge's
            store for ``method`` / ``coefficients``.
        tasks: the tasks, in dataloader order.
        heads / heads_dir: the per-task heads (dict or ``<task>.safetensors`` files).
        pretrained: theta_0's checkpoint, if ``encoder`` does not already hold it.
        method, method_options, merged, coefficients: the fixed merge (exactly one; see
            MergedEvaluation). Per-task merges (EMR, TALL) are not supported.
        rank: the surgery modules' inner width (16).
        lr: Adam's learning rate (1e-3).
        feature_dim: the encoder's output width (default: what the task types read off the heads,
            ``in_features`` / ``in_channels``).
        expert_batch_size: batch size of the one-off expert pass.
        task_types: as :class:`~.evaluate.MergedEvaluation`.
    """

    def __init__(self, encoder: nn.Module, store: str, tasks: list[str], heads: dict[str, nn.Module] | None = None,
                 heads_dir: str | None = None, pretrained: str | None = None, method: str | None = None,
                 method_options: dict | None = None, merged: str | None = None, coefficients: str | None = None,
                 rank: int = 16, lr: float = 1e-3, feature_dim: int | None = None, expert_batch_size: int = 128,
                 task_types: str | dict[str, str] = "classification"):
        _, theta0 = prepare_encoder(encoder, pretrained)
        if pretrained is None:   # the encoder's own tensors: keep a copy (a merge may be loaded into it)
            theta0 = {k: v.detach().clone() for k, v in theta0.items()}
        with TaskVectorStore(store) as st:
            st.check_pretrained({k: v.detach().cpu() for k, v in theta0.items()})
        super().__init__(encoder, tasks, heads=heads, heads_dir=heads_dir, store=store, pretrained=pretrained,
                         method=method, method_options=method_options, merged=merged, coefficients=coefficients,
                         per_task=False, task_types=task_types)
        if rank < 1:
            raise TvqError(f"rank={rank}: the surgery modules need rank >= 1 (16 in the paper)")
        self._theta0 = theta0
        dims = {t: feature_dim or self.task_types[t].feature_dim(self.model.heads[t]) for t in self.tasks}
        if any(d is None for d in dims.values()):
            raise TvqError("cannot tell the encoder's feature width from the heads; pass feature_dim")
        self.adapters = nn.ModuleList(SurgeryAdapter(int(dims[t]), rank) for t in self.tasks)
        self.expert_features: dict[str, Tensor] = {}
        self.expert_passes = 0   # how many times the expert features were computed (once per fit)

    # -- features -------------------------------------------------------------------------------------
    def merged_features(self, images: Tensor, task_index: int) -> Tensor:
        """The fixed merged encoder's features (no gradient)."""
        with torch.no_grad():
            return super()._features(images, task_index)

    def _features(self, images: Tensor, task_index: int) -> Tensor:
        tt = self.task_types[self.tasks[task_index]]
        return tt.map_features(self.adapters[task_index], self.merged_features(images, task_index))

    # -- expert targets (once) ------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()   # the merged network is frozen
        return self

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            check_unlabelled_data(self.trainer, "Surgery")

    def on_train_start(self) -> None:
        if not self.expert_features:
            self.compute_expert_features()

    @torch.no_grad()
    def compute_expert_features(self) -> None:
        """Every training sample's expert features, per task (no grad)."""
        datasets = indexed_datasets(self.trainer, self.tasks)
        with TaskVectorStore(self.hparams.store) as store:
            for t in self.tasks:
                params = expert_params(store, self._theta0, t, self.device)
                self.expert_features[t] = expert_outputs(self.model.encoder, params, datasets[t], lambda z: z,
                                                         self.device, self.hparams.expert_batch_size)
                del params
        self.expert_passes += 1

    # -- training ---------------------------------------------------------------------------------------
    def surgery_loss(self, batch) -> Tensor:
        """sum_t of the distance (mean L1) between task t's edited merged features and its expert's."""
        loss = None
        for i, t in enumerate(self.tasks):
            tt = self.task_types[t]
            idx, images = split_batch(batch, t, "Surgery", tt)
            target = self.expert_features[t][idx.to(self.expert_features[t].device)]
            part = tt.feature_distance(self._features(images, i), target)
            loss = part if loss is None else loss + part
        return loss

    def training_step(self, batch, batch_idx):
        loss = self.surgery_loss(batch)
        n = len(split_batch(batch, self.tasks[0], "Surgery", self.task_types[self.tasks[0]])[0])
        self.log("train/l1", loss, prog_bar=True, batch_size=n)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.adapters.parameters(), lr=self.hparams.lr)

    def save_adapters(self, path: str | Path) -> Path:
        """Write the surgery modules' weights (safetensors, ``<task>.down`` / ``<task>.up``)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({f"{t}.{n}": p.detach().cpu().contiguous() for t, a in zip(self.tasks, self.adapters)
                   for n, p in (("down", a.down.weight), ("up", a.up.weight))}, str(path))
        return path
