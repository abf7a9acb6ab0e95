"""BatchNorm running statistics of a merged encoder (docs/algorithms.md §6, docs/dense.md).

Task vectors merge weights; a BatchNorm layer also normalises with its *running statistics*
(``running_mean`` / ``running_var`` buffers), which are not weights but a summary of the
activations the layer saw. After a merge those statistics describe none of the models, and for a
dense encoder the choice decides the result (the prototype of docs/dense.md: task arithmetic
Δm −22.4 with θ0's statistics, −7.3 with the experts' mean). One policy is fixed per result and
stated with it:

``"merged"``
    The statistics keys are merged like any other key: θ0 + merge of their deltas (what the
    merging method gives them; under AdaMerging, coefficient-weighted). The default of the
    modules, so classification encoders (no BatchNorm, or as before) are unchanged.
``"pretrained"``
    θ0's statistics.
``"mean"``
    θ0 + mean_t τ_t on those keys, i.e. the mean of the experts' statistics (the task vectors as
    the store gives them back). The recommended policy for dense encoders (the prototype's best).
``"recompute"``
    Re-estimated with the merged weights on unlabelled training images of every task
    (:func:`recompute_bn_stats`: BatchNorm layers in training mode with ``momentum=None``, i.e.
    a cumulative average over a given number of batches; the rest of the encoder in eval mode).

The keys are found by *module type* (every ``torch.nn.modules.batchnorm._BatchNorm`` that tracks
running statistics: ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``), never by substrings of key names
(:func:`bn_stat_keys`). ``num_batches_tracked`` (an integer buffer) is never merged: θ0's.
Under "pretrained", "mean" and "recompute" the statistics keys are not coefficient-weighted by
AdaMerging / Tinting (:func:`drop_from_packed`); their value is the policy's.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import TvqError

BN_POLICIES = ("merged", "pretrained", "mean", "recompute")
_STATS = ("running_mean", "running_var")


def check_bn_policy(policy: str) -> str:
    """``policy`` if it is one of :data:`BN_POLICIES` (a one-line :class:`TvqError` otherwise)."""
    if policy not in BN_POLICIES:
        raise TvqError(f"bn_stats={policy!r}: choose one of {', '.join(BN_POLICIES)} (docs/dense.md, BatchNorm statistics)")
    return policy


def _bn_modules(module: nn.Module) -> Iterator[tuple[str, _BatchNorm]]:
    for name, m in module.named_modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None:
            yield name, m


def _key(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr


def bn_stat_keys(module: nn.Module) -> list[str]:
    """State-dict keys of the running statistics of every BatchNorm module of ``module``."""
    return [_key(name, a) for name, _ in _bn_modules(module) for a in _STATS]


def bn_statistics(policy: str, keys: Sequence[str], pretrained: Mapping[str, Tensor],
                  task_vectors: Mapping[str, Sequence[Tensor]] | None = None,
                  merged: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The statistics ``policy`` gives ``keys`` (a pure function; "recompute" needs data: see
    :func:`recompute_bn_stats`).

    Args:
        pretrained: θ0 by key.
        task_vectors: ``{key: [τ_1, ..., τ_T]}`` ("mean"); a key left out has zero task vectors.
        merged: the merged model by key ("merged").

    Values keep θ0's dtype; "mean" is computed in float32.
    """
    check_bn_policy(policy)
    if policy == "recompute":
        raise TvqError("bn_stats='recompute' needs images: use recompute_bn_stats(encoder, batches)")
    out = {}
    for k in keys:
        p = pretrained[k]
        if policy == "merged":
            if merged is None:
                raise TvqError("bn_stats='merged' needs the merged weights")
            out[k] = merged[k]
        elif policy == "pretrained":
            out[k] = p.detach().clone()
        else:
            taus = (task_vectors or {}).get(k) or []
            mean = torch.stack([t.float() for t in taus]).mean(0) if taus else torch.zeros(p.shape)
            out[k] = (p.detach().float() + mean.to(p.device)).to(p.dtype)
    return out


def store_bn_statistics(policy: str, keys: Sequence[str], pretrained: Mapping[str, Tensor], store,
                        tasks: Sequence[str] | None = None) -> dict[str, Tensor] | None:
    """:func:`bn_statistics` with the task vectors of ``store`` (a path or an open
    :class:`~tvq_lightning.store.reader.TaskVectorStore`): ``{key: value}`` for "pretrained" and
    "mean", None for "merged" and "recompute" (nothing fixed in advance)."""
    check_bn_policy(policy)
    if policy in ("merged", "recompute"):
        return None
    missing = [k for k in keys if k not in pretrained]
    if missing:
        raise TvqError(f"θ0 has no BatchNorm statistic {missing[0]!r}; give the encoder's own pre-trained weights")
    if policy == "pretrained":
        return bn_statistics(policy, keys, pretrained)
    if store is None:
        raise TvqError("bn_stats='mean' needs store= (the task vectors of the statistics)")
    from ..store.reader import TaskVectorStore

    own = not isinstance(store, TaskVectorStore)
    st = TaskVectorStore(store) if own else store
    try:
        tasks = list(st.tasks if tasks is None else tasks)
        taus = {k: st.task_vectors(k, tasks, pretrained[k].detach().cpu()) for k in keys if k in st.layout.keys}
    finally:
        st.close() if own else st.release()
    return bn_statistics(policy, keys, pretrained, taus)


def load_bn_statistics(encoder: nn.Module, stats: Mapping[str, Tensor]) -> None:
    """Copy ``stats`` into ``encoder``'s BatchNorm buffers (in place)."""
    bufs = dict(encoder.named_buffers())
    with torch.no_grad():
        for k, v in stats.items():
            bufs[k].copy_(v.to(bufs[k].device, bufs[k].dtype))


@torch.no_grad()
def recompute_bn_stats(encoder: nn.Module, batches: Iterable[Tensor], num_batches: int | None = None,
                       params: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Re-estimate every BatchNorm module's running statistics of ``encoder`` on ``batches``.

    The encoder runs with ``params`` (e.g. merged weights, through ``functional_call``; its own
    tensors otherwise), BatchNorm modules in training mode with ``momentum=None`` (a cumulative
    average over the batches), everything else in eval mode, on at most ``num_batches`` batches.
    The encoder itself is left as it was (buffers, modes, momenta); the new statistics come back
    as ``{key: tensor}`` (:func:`load_bn_statistics` puts them in).
    """
    mods = list(_bn_modules(encoder))
    if not mods:
        return {}
    ref = mods[0][1].running_mean
    fresh: dict[str, Tensor] = {}
    for name, m in mods:
        fresh[_key(name, "running_mean")] = torch.zeros_like(m.running_mean)
        fresh[_key(name, "running_var")] = torch.ones_like(m.running_var)
        fresh[_key(name, "num_batches_tracked")] = torch.zeros((), dtype=torch.long, device=ref.device)
    call = {**{k: v for k, v in (params or {}).items() if k not in fresh}, **fresh}
    saved = [(m, m.momentum) for _, m in mods]
    was_training = [(m, m.training) for m in encoder.modules()]
    seen = 0
    try:
        encoder.eval()
        for _, m in mods:
            m.train()
            m.momentum = None
        for x in batches:
            if num_batches is not None and seen >= num_batches:
                break
            functional_call(encoder, call, (x.to(ref.device),))
            seen += 1
    finally:
        for m, mom in saved:
            m.momentum = mom
        for m, mode in was_training:
            m.training = mode
    if seen == 0:
        raise TvqError("bn_stats='recompute' got no images to re-estimate the BatchNorm statistics on; "
                       "give a datamodule with training images (or bn_batches > 0)")
    return {k: v for k, v in fresh.items() if not k.endswith("num_batches_tracked")}


def train_image_batches(datamodule, tasks: Sequence[str], batches_per_task: int) -> Iterator[Tensor]:
    """Unlabelled training images of every task (``datamodule.split(task, "train")``, first
    element of each sample), ``batches_per_task`` batches each, in a fixed shuffled order."""
    from torch.utils.data import DataLoader

    from ..data.multitask import ImagesOnly

    split: Callable | None = getattr(datamodule, "split", None)
    if split is None:
        raise TvqError("bn_stats='recompute' needs a MultiTaskDataModule (its training images re-estimate the "
                       "BatchNorm statistics)")
    size = int(getattr(datamodule, "batch_size", 32))
    for t in tasks:
        loader = DataLoader(ImagesOnly(split(t, "train")), batch_size=size, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        for i, x in enumerate(loader):
            if i >= batches_per_task:
                break
            yield x


def drop_from_packed(packed, keys: Iterable[str]) -> list[str]:
    """Stop ``packed`` (:class:`~tvq_lightning.adapt.packed.PackedTaskVectors`) from merging ``keys``:
    their task vectors are released and ``has_vector`` turns False, so every merge over it
    (``merged_params``, the streamed encoder) uses the encoder's own tensor for them. Returns the
    keys dropped."""
    from ..adapt.packed import _buffer_name

    dropped = []
    for k in keys:
        if k not in packed.keys or not packed.has_vector(k):
            continue
        e = packed._entry(k)
        for t, suffixes in enumerate(e.suffixes):
            for s in suffixes:
                name = _buffer_name(f"k{e.index}_t{t}", s)
                if name in packed._buffers:
                    del packed._buffers[name]
        e.kinds = [None] * len(e.kinds)
        e.suffixes = [()] * len(e.suffixes)
        dropped.append(k)
    return dropped


def apply_bn_policy(encoder: nn.Module, policy: str, pretrained: Mapping[str, Tensor], store=None,
                    tasks: Sequence[str] | None = None, packed=None) -> dict[str, Tensor]:
    """Set up ``policy`` on ``encoder`` (a private copy: its buffers change) for a merge over
    ``packed``: the statistics keys leave the coefficient-weighted merge, and the encoder's
    buffers hold "pretrained" / "mean" statistics ("recompute": the mean until
    :func:`recompute_from_datamodule` runs; the mean needs ``store``, else θ0's). Returns θ0's
    statistics (what the experts θ0 + τ_t are built on)."""
    check_bn_policy(policy)
    keys = bn_stat_keys(encoder)
    theta0 = {k: pretrained[k].detach().clone() for k in keys if k in pretrained}
    if policy == "merged" or not keys:
        return theta0
    if packed is not None:
        drop_from_packed(packed, keys)
    initial = "pretrained" if policy == "recompute" and store is None else ("mean" if policy == "recompute" else policy)
    load_bn_statistics(encoder, store_bn_statistics(initial, keys, pretrained, store, tasks))
    return theta0


def recompute_from_datamodule(encoder: nn.Module, datamodule, tasks: Sequence[str], batches_per_task: int,
                              params: Mapping[str, Tensor] | None = None) -> None:
    """"recompute": re-estimate ``encoder``'s statistics (with ``params``) on every task's training
    images and load them into its buffers."""
    batches = train_image_batches(datamodule, tasks, batches_per_task)
    load_bn_statistics(encoder, recompute_bn_stats(encoder, batches, params=params))
