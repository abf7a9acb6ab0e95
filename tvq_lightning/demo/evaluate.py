"""Accuracy of models of the fine-tuned top on the tasks' cached stem features, and store diagnostics.

Models are state dicts of ``visual.top`` (θ0, a merge, θ0 + τ̂_t); a forward is
``head_t(functional_call(top, params, features))``, scored by the classification task type's
main metric (:meth:`~tvq_lightning.tasks.TaskType.score`). Accuracies are percentages.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torch.func import functional_call

from ..store.reader import TaskVectorStore
from ..tasks import create_task_type
from .bench import Bench

TASK_TYPE = create_task_type("classification")   # every task of the embedded benchmark


class Evaluator:
    def __init__(self, bench: Bench):
        self.bench = bench
        self.top = bench.top().eval()
        self._stacked: dict[str, Tensor] = {}

    @torch.no_grad()
    def task_accuracy(self, params: Mapping[str, Tensor], task: str, split: str = "test",
                      head: torch.nn.Module | None = None) -> float:
        x, y = self.bench.data[task][split]
        head = head if head is not None else self.bench.heads[task]
        correct = 0
        for i in range(0, len(x), 1024):
            z = functional_call(self.top, dict(params), (x[i:i + 1024],))
            correct += TASK_TYPE.score(head(z), y[i:i + 1024])[0]
        return 100.0 * correct / max(len(x), 1)

    @torch.no_grad()
    def accuracy(self, params: Mapping[str, Tensor], split: str = "test") -> dict[str, float]:
        """One model on every task: one forward over all tasks' inputs (bigger matrix products)."""
        tasks = self.bench.tasks
        if split not in self._stacked:
            self._stacked[split] = torch.cat([self.bench.data[t][split][0] for t in tasks])
        z = torch.cat([functional_call(self.top, dict(params), (x,)) for x in self._stacked[split].split(4096)])
        out, start = {}, 0
        for t in tasks:
            y = self.bench.data[t][split][1]
            correct, _ = TASK_TYPE.score(self.bench.heads[t](z[start:start + len(y)]), y)
            out[t] = 100.0 * correct / max(len(y), 1)
            start += len(y)
        return out

    def per_task_accuracy(self, models: Mapping[str, Mapping[str, Tensor]], split: str = "test") -> dict[str, float]:
        """Task t's own model on task t."""
        return {t: self.task_accuracy(models[t], t, split) for t in self.bench.tasks}


def storage_entry(store: TaskVectorStore) -> dict:
    """A store's line of the report's ``storage``: bytes on disk, ratio to fp32, bits, scheme label."""
    from ..store.summary import summarize

    summ = summarize(store)
    return {"bytes": int(summ["bytes_on_disk"]), "ratio_to_fp32": float(summ["ratio_to_fp32"]),
            "bits_per_param": float(summ["bits_per_param"]), "label": summ["scheme"]}


def quantization_error(store: TaskVectorStore, exact: TaskVectorStore, pretrained: Mapping[str, Tensor],
                       tasks: Sequence[str]) -> float:
    """``||τ̂ − τ|| / ||τ||`` over every task and every tensor the store quantizes."""
    num = den = 0.0
    for k in store.keys:
        if not store.layout.keys[k].quantized:
            continue
        for t in tasks:
            tau = exact.task_vector(t, k).float()
            num += float(torch.sum((store.task_vector(t, k, pretrained[k]).float() - tau) ** 2))
            den += float(torch.sum(tau ** 2))
    return (num / den) ** 0.5 if den > 0 else 0.0


def range_ratio(exact: TaskVectorStore, pretrained: Mapping[str, Tensor], tasks: Sequence[str],
                keys: Sequence[str]) -> float:
    """Mean over tasks and the tensors ``keys`` (those the quantized stores quantize) of
    ``range(θ_t) / range(τ_t)``, skipping tensors τ_t leaves unchanged."""
    ratios = []
    for k in keys:
        for t in tasks:
            tau = exact.task_vector(t, k).float()
            r_tau = float(tau.max() - tau.min())
            if r_tau > 0:
                theta = pretrained[k].float() + tau
                ratios.append(float(theta.max() - theta.min()) / r_tau)
    return sum(ratios) / max(len(ratios), 1)


def task_vector_cosine(exact: TaskVectorStore, tasks: Sequence[str], keys: Sequence[str]) -> float:
    """Mean pairwise cosine similarity of the tasks' vectors over the tensors ``keys`` (a Gram
    matrix accumulated key by key: what RTVQ's shared base can capture)."""
    gram = torch.zeros(len(tasks), len(tasks), dtype=torch.float64)
    for k in keys:
        stacked = torch.stack([exact.task_vector(t, k).double().reshape(-1) for t in tasks])
        gram += stacked @ stacked.T
    norms = gram.diagonal().sqrt().clamp_min(1e-30)
    cos = gram / norms[:, None] / norms[None, :]
    n = len(tasks)
    return float((cos.sum() - cos.diagonal().sum()) / max(n * (n - 1), 1))
