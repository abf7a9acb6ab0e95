"""AdaMerging (task-wise / layer-wise, optionally ++) on packed task vectors (docs/algorithms.md §5).

theta = theta_0 + sum_t lambda_t tau_t (task-wise) or theta_k = theta0_k + sum_t lambda_{k,t} tau_{k,t}
(layer-wise: one coefficient per store key and task). Coefficients start at ``init`` (0.3), are
clamped to [0, 1] in forward, and minimise sum_t of task t's unsupervised adaptation objective on
its unlabelled batch (:meth:`~tvq_lightning.tasks.TaskType.adaptation_objective`; classification:
the mean Shannon entropy of head_t's softmax), with Adam (lr 1e-3). Run it as
``Trainer(max_steps=500).fit(module, dm)`` where ``dm.train_dataloader()`` is a CombinedLoader
``{task: (indices, images)}`` (or ``{task: images}``).
Types without an entropy (depth, normals: ``adapts_to_expert``) minimise instead their
:meth:`~tvq_lightning.tasks.TaskType.expert_objective` against the task expert's predictions
(theta_0 + tau_t with the task's head), computed once per sample at ``on_train_start``
(:meth:`AdaMerging.compute_expert_targets`, as Tinting's) and looked up by the batch's indices.

Memory: the task vectors stay packed on the device (:class:`~..adapt.packed.PackedTaskVectors`,
non-persistent buffers). With ``checkpoint_tasks=True`` (the default) every task's images go
through the encoder in ONE pass (concatenated: the frozen eval-mode encoder treats samples
independently) whose weights are merged block by block inside the forward
(:class:`~..adapt.streamed.StreamedEncoder`): each block's merged weights exist only while it runs
and are rebuilt, with its activations, in backward, where the weight gradients become
coefficient gradients. Each block runs (and is rebuilt) on one task's share of the batch at a
time, and the concatenated batch is not kept for backward (the tasks' own batches are:
:func:`~..adapt.streamed.saved_as_parts`). Besides theta_0 and the packed codes the step then
holds one block's weights and weight gradients, one share's activations of that block, and each
block's input. ``checkpoint_tasks=False`` merges the whole encoder once per step
(:func:`~..adapt.merge_fn.merged_params`) and keeps every task's activations: faster, but two
more fp32 copies of the model (the merged weights and their gradients) and all activations.
Either way the merge decodes in forward and again in backward and is shared by every task of the
step. The encoder and heads are frozen and in eval mode.

BatchNorm statistics (``bn_stats``, :mod:`~..merging.bn_stats`, docs/algorithms.md §6): ``"merged"``
(default) weights the statistics keys by the coefficients like any key; under ``"pretrained"``,
``"mean"`` and ``"recompute"`` they are not coefficient-weighted: the encoder holds θ0's or the
experts' mean statistics ("recompute": the mean while adapting, then re-estimated with the learned
merge on ``bn_batches`` batches of every task's training images at the start of test / predict).

DDP: the coefficients are this module's only trainable ``nn.Parameter``, all used every step, so
DDP all-reduces their gradients without ``find_unused_parameters`` and every rank keeps identical
coefficients; the packed buffers are listed in ``_ddp_params_and_buffers_to_ignore``, so DDP does
not re-broadcast them at every forward.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.func import functional_call

from ..adapt.merge_fn import base_tensors, merged_params
from ..adapt.packed import PackedTaskVectors
from ..adapt.streamed import StreamedEncoder, saved_as_parts
from ..errors import FingerprintMismatch, TvqError
from ..merging.bn_stats import apply_bn_policy, check_bn_policy, recompute_from_datamodule
from ..merging.methods.ties import TiesConfig
from ..models.multitask import MultiTaskModel
from ..store.reader import TaskVectorStore
from ..tasks import resolve_task_types
from ._experts import check_unlabelled_data, expert_outputs, expert_params, indexed_datasets, split_batch
from ._multitask_eval import MultiTaskEvalMixin, prepare_encoder, resolve_heads, split_outputs

COEFF_FORMAT = "tvq_lightning.adamerging_coefficients"
GRANULARITIES = ("task", "layer")


@dataclass
class Coefficients:
    """A saved coefficient file: the clamped coefficients and what they belong to."""

    values: Tensor           # (T,) task-wise or (K, T) layer-wise
    tasks: list[str]
    keys: list[str]
    granularity: str
    plus: bool
    ties_k: float
    fingerprint: str         # of the pre-trained weights of the store they were learned on

    def check(self, packed: PackedTaskVectors, path: str | Path = "coefficients") -> None:
        if self.fingerprint != packed.fingerprint:
            raise FingerprintMismatch(f"{path}: the coefficients were learned on a store of other pre-trained weights "
                                      f"than store {packed.store_path}")
        T, K = len(packed.tasks), len(packed.keys)
        want = (T,) if self.granularity == "task" else (K, T)
        if tuple(self.values.shape) != want or (self.granularity == "layer" and self.keys != packed.keys):
            raise TvqError(f"{path}: {self.granularity}-wise coefficients of shape {tuple(self.values.shape)} do not fit "
                           f"store {packed.store_path} with {T} tasks and {K} keys (expected {want})")


def read_coefficients(path: str | Path) -> Coefficients:
    """Read a file written by :meth:`AdaMerging.save_coefficients`."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("tvq", "{}"))
            values = f.get_tensor("coefficients")
    except Exception as e:  # noqa: BLE001 - unreadable, not safetensors, missing tensor
        raise TvqError(f"{path} is not a readable coefficient file ({e}); save one with AdaMerging.save_coefficients") from None
    if meta.get("format") != COEFF_FORMAT or meta.get("granularity") not in GRANULARITIES:
        raise TvqError(f"{path} is not an AdaMerging coefficient file of a version this tvq_lightning reads")
    c = Coefficients(values.float(), list(meta["tasks"]), list(meta["keys"]), meta["granularity"], bool(meta["plus"]),
                     float(meta["ties_k"]), meta["fingerprint"])
    T, K = len(c.tasks), len(c.keys)
    if tuple(values.shape) != ((T,) if c.granularity == "task" else (K, T)):
        raise TvqError(f"{path}: coefficients of shape {tuple(values.shape)} disagree with its {T} tasks and {K} keys")
    return c


class AdaMerging(MultiTaskEvalMixin, pl.LightningModule):
    """Test-time adaptation of merging coefficients by entropy minimisation.

    Args:
        encoder: the pre-trained encoder (theta_0; its state dict must match the store's fingerprint,
            or pass ``pretrained``, which is then loaded into a copy of it).
        store: the task-vector store (any scheme: fp32, fq, tvq, rtvq).
        tasks: the tasks to merge, in dataloader order (default: the store's).
        heads / heads_dir: the per-task heads (dict or ``<task>.safetensors`` files).
        pretrained: theta_0's checkpoint, if ``encoder`` does not already hold it.
        granularity: ``"task"`` (lambda_t) or ``"layer"`` (lambda_{k,t} per store key).
        plus: AdaMerging++: adapt TIES-trimmed (top ``ties_k``), sign-elected task vectors.
        init, lr, clamp: initial coefficient, Adam learning rate, forward clamp range.
        coefficients_out: where to save the learned coefficients when ``fit`` ends.
        checkpoint_tasks: merge block by block inside one forward over every task's images and
            recompute each block in backward (one more forward and one more decode per step):
            no full set of merged weights, weight gradients or activations is ever held.
        task_types: the task type of every task (a registered name, e.g. ``classification``), or
            ``{task: name}`` (tasks left out are classification).
        bn_stats: the BatchNorm statistics policy (merged / pretrained / mean / recompute).
        bn_batches: "recompute": batches of training images per task.
    """

    def __init__(self, encoder: nn.Module, store: str, tasks: list[str] | None = None,
                 heads: dict[str, nn.Module] | None = None, heads_dir: str | None = None, pretrained: str | None = None,
                 granularity: str = "task", plus: bool = False, ties_k: float = 0.2, init: float = 0.3,
                 lr: float = 1e-3, clamp: tuple[float, float] = (0.0, 1.0), coefficients_out: str | None = None,
                 checkpoint_tasks: bool = True, task_types: str | dict[str, str] = "classification",
                 bn_stats: str = "merged", bn_batches: int = 20):
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "heads"])
        if granularity not in GRANULARITIES:
            raise TvqError(f"granularity={granularity!r}: choose 'task' (one coefficient per task) or 'layer' (per key and task)")
        st = TaskVectorStore(store)
        self.tasks = list(tasks or st.tasks)
        self.task_types = resolve_task_types(self.tasks, task_types)
        given = encoder
        encoder, pre_sd = prepare_encoder(encoder, pretrained)
        if check_bn_policy(bn_stats) != "merged" and encoder is given:   # its buffers change: a copy
            encoder = copy.deepcopy(encoder)
        self.model = MultiTaskModel(encoder, resolve_heads(self.tasks, heads, heads_dir, self.task_types)).requires_grad_(False)
        self.packed = PackedTaskVectors(st, pre_sd, self.tasks, ties=TiesConfig(k=ties_k) if plus else None)
        self._bn_theta0 = apply_bn_policy(encoder, bn_stats, pre_sd, st, self.tasks, packed=self.packed)
        shape = (len(self.tasks),) if granularity == "task" else (len(self.packed.keys), len(self.tasks))
        self.coefficients = nn.Parameter(torch.full(shape, float(init)))
        # DDP: the packed codes are identical on every rank; never re-broadcast them.
        self._ddp_params_and_buffers_to_ignore = self.packed.buffer_names("packed.")
        self._eval_params: dict[str, Tensor] | None = None
        self._init_eval()
        # expert pseudo-targets per sample (types that adapt to the expert; Tinting: every task)
        self.expert_targets: dict[str, Tensor] = {}
        self.expert_conf: dict[str, Tensor] = {}
        self.expert_passes = 0   # how many times the expert targets were computed (once per fit)

    # -- the merge ------------------------------------------------------------------------------
    def lambdas(self) -> Tensor:
        """The coefficients as used: clamped to ``clamp`` (differentiable)."""
        lo, hi = self.hparams.clamp
        return self.coefficients.clamp(lo, hi)

    def pretrained_tensors(self) -> dict[str, Tensor]:
        """θ0 by name: the encoder's tensors with θ0's BatchNorm statistics (what experts build on)."""
        base = base_tensors(self.model.encoder)
        return {**base, **{k: v.to(base[k].device) for k, v in self._bn_theta0.items() if k in base}}

    def merged_params(self) -> dict[str, Tensor]:
        """The merged encoder weights for the current coefficients (one merge; see merge_fn)."""
        return merged_params(self.packed, base_tensors(self.model.encoder), self.lambdas())

    def merged_state_dict(self) -> dict[str, Tensor]:
        """The whole merged encoder (detached): :meth:`merged_params` over the encoder's own
        tensors, whose BatchNorm buffers hold the ``bn_stats`` policy's statistics. What another
        copy of the encoder needs to compute the adapted model (``merged_params`` alone leaves out
        the keys it does not merge, BatchNorm statistics under every policy but "merged")."""
        with torch.no_grad():
            return {**{k: v.detach() for k, v in base_tensors(self.model.encoder).items()},
                    **{k: v.detach() for k, v in self.merged_params().items()}}

    def unlabelled_inputs(self, batch) -> list[Tensor]:
        """Every task's inputs of a training batch ``{task: (indices, inputs) or inputs}``, in task order."""
        return [self.task_types[t].unlabelled(batch[t])[1] for t in self.tasks]

    def adaptation_loss(self, batch: dict) -> Tensor:
        """sum_t of task t's adaptation objective (classification: mean entropy of head_t's softmax)
        on its images, through ONE merge."""
        feats = self.task_features(self.unlabelled_inputs(batch))
        loss = None
        for t, f in zip(self.tasks, feats):
            h = self.task_objective(t, batch[t], self.model.heads[t](f))
            loss = h if loss is None else loss + h
        return loss

    @property
    def expert_tasks(self) -> list[str]:
        """The tasks whose type adapts to its expert's cached pseudo-targets (depth, normals)."""
        return [t for t in self.tasks if self.task_types[t].adapts_to_expert]

    def task_objective(self, task: str, item, outputs: Tensor) -> Tensor:
        """Task ``task``'s adaptation objective on ``outputs`` of its training batch ``item``: the
        type's own, or (``adapts_to_expert``) its expert objective against the cached pseudo-targets
        of the batch's samples (:meth:`compute_expert_targets`)."""
        tt = self.task_types[task]
        if not tt.adapts_to_expert:
            return tt.adaptation_objective(outputs)
        if task not in self.expert_targets:
            raise TvqError(f"task {task!r} ({tt.name}) adapts to its expert's pseudo-targets, computed when fitting "
                           "starts; call compute_expert_targets() first")
        idx, _ = split_batch({task: item}, task, type(self).__name__, tt)
        idx = idx.to(self.expert_targets[task].device)
        return tt.expert_objective(outputs, self.expert_targets[task][idx], self.expert_conf[task][idx])

    def task_features(self, images: list[Tensor]) -> list[Tensor]:
        """The merged encoder's features of each task's images (in task order), for the current
        coefficients; see ``checkpoint_tasks`` for how the merge is built."""
        encoder = self.model.encoder
        if not self.hparams.checkpoint_tasks:
            params = self.merged_params()
            return [functional_call(encoder, params, (x,)) for x in images]
        lam = self.lambdas()
        if len({(x.shape[1:], x.dtype, x.device) for x in images}) > 1:   # cannot share one batch
            return [StreamedEncoder(encoder, self.packed)(lam, x) for x in images]
        # one pass over every task's images; each block runs (and is recomputed) one task's share at a time
        streamed, batch = StreamedEncoder(encoder, self.packed, chunk=max(len(x) for x in images)), torch.cat(images)
        with saved_as_parts(batch, images):   # the patch embedding keeps the task batches, not their copy
            out = streamed(lam, batch)
        return split_outputs(out, [len(x) for x in images])

    # -- Lightning ------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # frozen networks: no dropout, BatchNorm uses its running statistics
        return self

    def setup(self, stage: str) -> None:
        self._check_eval_data()
        if stage == "fit" and self.expert_tasks:
            check_unlabelled_data(self.trainer, type(self).__name__)

    def on_train_start(self) -> None:
        missing = [t for t in self.expert_tasks if t not in self.expert_targets]
        if missing:
            self.compute_expert_targets(missing)

    @torch.no_grad()
    def compute_expert_targets(self, tasks: list[str] | None = None) -> None:
        """Expert pseudo-targets and confidences (:meth:`~tvq_lightning.tasks.TaskType.pseudo_targets`
        of theta_0 + tau_t with the task's head) for every training sample of ``tasks`` (default:
        all), without gradients."""
        datasets = indexed_datasets(self.trainer, self.tasks)
        pre = {k: v.detach() for k, v in self.pretrained_tensors().items()}   # θ0's BatchNorm statistics too
        with TaskVectorStore(self.hparams.store) as store:
            for t in self.tasks if tasks is None else tasks:
                params = expert_params(store, pre, t, self.device)
                self.expert_targets[t], self.expert_conf[t] = self._expert_pass(t, params, datasets[t])
                del params
        self.expert_passes += 1

    def _expert_pass(self, task: str, params: dict[str, Tensor], dataset) -> tuple[Tensor, Tensor]:
        """``(targets, confidences)`` of the expert ``params`` with the task's (frozen) head on ``dataset``."""
        head, tt = self.model.heads[task], self.task_types[task]
        return expert_outputs(self.model.encoder, params, dataset, lambda z: tt.pseudo_targets(head(z)), self.device,
                              self.hparams.get("expert_batch_size", 128))

    def training_step(self, batch, batch_idx):
        missing = [t for t in self.tasks if t not in batch]
        if missing:
            raise TvqError(f"the training batch has no images for task {missing[0]!r}; fit on the datamodule's "
                           "CombinedLoader {task: images} (a datamodule without train_task)")
        loss = self.adaptation_loss(batch)
        n = len(self.task_types[self.tasks[0]].unlabelled(batch[self.tasks[0]])[1])
        self.log("train/entropy", loss, prog_bar=True, batch_size=n)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam([self.coefficients], lr=self.hparams.lr)

    def on_fit_end(self) -> None:
        if self.hparams.coefficients_out and self.trainer.is_global_zero:
            self.save_coefficients(self.hparams.coefficients_out)

    def _features(self, images: Tensor, task_index: int) -> Tensor:
        if self._eval_params is None:
            self._prepare_eval()
        return functional_call(self.model.encoder, self._eval_params, (images,))

    def _prepare_eval(self) -> None:
        with torch.no_grad():
            self._eval_params = {k: v.detach() for k, v in self.merged_params().items()}
        dm = getattr(self._trainer, "datamodule", None)
        if self.hparams.bn_stats == "recompute" and dm is not None:
            recompute_from_datamodule(self.model.encoder, dm, self.tasks,
                                      self.hparams.bn_batches, self._eval_params)

    def on_test_epoch_start(self) -> None:
        self._prepare_eval()

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch, dataloader_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
        self._eval_params = None

    def on_predict_epoch_start(self) -> None:
        self._prepare_eval()

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0) -> dict:
        """``{"task": name, "preds": ...}`` of the adapted merge (one predict loader per task)."""
        return self._predict_step(batch, dataloader_idx)

    def on_predict_epoch_end(self) -> None:
        self._eval_params = None

    # -- coefficient files ----------------------------------------------------------------------
    def save_coefficients(self, path: str | Path) -> Path:
        """Write the clamped coefficients (safetensors, metadata in its header) and a JSON twin."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": COEFF_FORMAT, "version": 1, "tasks": self.tasks, "keys": self.packed.keys,
                "granularity": self.hparams.granularity, "plus": bool(self.hparams.plus),
                "ties_k": float(self.hparams.ties_k), "fingerprint": self.packed.fingerprint,
                "store": self.packed.store_path}
        values = self.lambdas().detach().float().cpu().contiguous()
        save_file({"coefficients": values}, str(path), metadata={"tvq": json.dumps(meta)})
        path.with_suffix(".json").write_text(json.dumps({**meta, "coefficients": values.tolist()}, indent=1))
        return path

    def load_coefficients(self, path: str | Path) -> None:
        """Set the coefficients from a saved file (same store, tasks, granularity and ++ setting)."""
        c = read_coefficients(path)
        if c.tasks != self.tasks or c.granularity != self.hparams.granularity or c.plus != bool(self.hparams.plus):
            raise TvqError(f"{path}: {c.granularity}-wise{'++' if c.plus else ''} coefficients for tasks {c.tasks} do not fit this "
                           f"{self.hparams.granularity}-wise{'++' if self.hparams.plus else ''} AdaMerging over {self.tasks}")
        c.check(self.packed, path)
        with torch.no_grad():
            self.coefficients.copy_(c.values.to(self.coefficients.device))
