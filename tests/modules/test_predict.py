"""``Trainer.predict`` of every multi-task module: per task loader (``dataloader_idx`` = task index),
``{"task": name, "preds": labels}`` batches of the (merged / adapted) model, whose accuracy is
exactly the one ``test`` logs."""
from __future__ import annotations

import pytest
import torch

from tvq_lightning.data import ToyTasks
from tvq_lightning.models.heads import ClassificationHead
from tvq_lightning.modules import AdaMerging, FineTuneModule, MergedEvaluation, Surgery, Tinting
from tvq_lightning.store import load_state_dict
from tvq_lightning.testing import TinyEncoder

from _adapt_setup import trainer  # noqa: E402

TASKS = ["a", "b"]


def _dm() -> ToyTasks:
    return ToyTasks(tasks=TASKS, batch_size=32, eval_batch_size=50)


def _check(module, dm: ToyTasks, tasks=TASKS) -> None:
    tr = trainer(limit_val_batches=0)
    preds = tr.predict(module, dm)
    tr.test(module, dm, verbose=False)
    assert len(preds) == len(TASKS)
    for i, t in enumerate(TASKS):
        if t not in tasks:                        # fine-tuning: other tasks' loaders give None
            assert all(b is None for b in preds[i])
            continue
        labels = dm.split(t, "test").tensors[1]
        assert {b["task"] for b in preds[i]} == {t}
        got = torch.cat([b["preds"] for b in preds[i]])
        assert got.shape == labels.shape and got.dtype == torch.long
        want = module.results[t] if hasattr(module, "results") else float(tr.callback_metrics["test/acc"])
        assert float((got == labels).float().mean()) == pytest.approx(want)


def _kw(assets) -> dict:
    return dict(heads_dir=str(assets["heads_dir"]), pretrained=str(assets["pretrained"]))


@pytest.mark.parametrize("kind", ["evaluate", "adamerging", "tinting", "surgery"])
def test_multitask_modules_predict(assets, kind):
    enc, store = TinyEncoder(width=32, depth=1), str(assets["store"])
    if kind == "evaluate":
        m = MergedEvaluation(enc, TASKS, store=store, method="task_arithmetic", **_kw(assets))
    elif kind == "adamerging":
        m = AdaMerging(enc, store, TASKS, granularity="layer", **_kw(assets))
    elif kind == "tinting":
        m = Tinting(enc, store, TASKS, **_kw(assets))
    else:
        m = Surgery(enc, store, TASKS, method="task_arithmetic", **_kw(assets))
    if kind != "evaluate":
        trainer(max_steps=2, limit_val_batches=0).fit(m, _dm())
    _check(m, _dm())


def test_finetune_predicts_its_own_task(assets):
    head = ClassificationHead.load(assets["heads_dir"] / "b.safetensors")
    m = FineTuneModule(TinyEncoder(width=32, depth=1), "b", head=head)
    m.encoder.load_state_dict(load_state_dict(assets["pretrained"]))
    _check(m, _dm(), tasks=["b"])
