"""A toy per-pixel regression task type, registered from the tests only, through every floor:
fine-tuning (FineTuneModule), merged evaluation (MergedEvaluation + MultiTaskReport), AdaMerging,
Tinting and Surgery, on a tiny conv encoder and a tiny TVQ store. The registry is cleaned after."""
from __future__ import annotations

import copy
import json
import warnings

import lightning.pytorch as pl
import pytest
import torch

from tvq_lightning.callbacks import MultiTaskReport
from tvq_lightning.modules import AdaMerging, FineTuneModule, MergedEvaluation, Surgery, Tinting
from tvq_lightning.store import StoreConfig, TaskVectorStore, quantize_to_store
from tvq_lightning.tasks import list_task_types, register_task_type, unregister_task_type

from _toy_dense import NAME, ConvEncoder, ToyDepth, ToyMaps, abs_err_sums  # noqa: E402

TASKS = ["blur", "edge"]
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")


def _trainer(**kw) -> pl.Trainer:
    opts = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    opts.update(kw)
    return pl.Trainer(**opts)


@pytest.fixture(scope="module")
def toy_type():
    register_task_type(NAME, ToyDepth)
    yield NAME
    unregister_task_type(NAME)
    assert NAME not in list_task_types()          # nothing leaks into other tests


@pytest.fixture(scope="module")
def experts(toy_type, tmp_path_factory):
    """Fine-tune encoder + decoder per task with FineTuneModule, then store the encoders' task vectors."""
    root = tmp_path_factory.mktemp("toy-dense")
    torch.manual_seed(0)
    base = ConvEncoder()
    pre = {k: v.detach().clone() for k, v in base.state_dict().items()}
    heads, fts, errors = {}, {}, {}
    for t in TASKS:
        torch.manual_seed(1)
        m = FineTuneModule(copy.deepcopy(base), t, task_type=NAME, lr=5e-3, weight_decay=0.0, warmup_steps=0)
        dm = ToyMaps(train_task=t)
        _trainer(max_steps=40).fit(m, dm)
        assert all(p.requires_grad for p in m.head.parameters())         # the decoder trained with the encoder
        tester = _trainer()
        tester.test(m, dm, verbose=False)
        errors[t] = float(tester.callback_metrics["test/abs_err"])
        heads[t] = copy.deepcopy(m.head).requires_grad_(False)
        fts[t] = {k: v.detach().clone() for k, v in m.encoder.state_dict().items()}
    quantize_to_store(pre, fts, root / "store", StoreConfig("tvq", bits=8), progress=False)
    return {"root": root, "pre": pre, "heads": heads, "store": root / "store", "errors": errors}


def _encoder(experts) -> ConvEncoder:
    enc = ConvEncoder()
    enc.load_state_dict(experts["pre"])
    return enc


def _zero_error(task: str) -> float:
    _, target, mask = ToyMaps().split(task, "test").tensors
    total, count = abs_err_sums(torch.zeros_like(target), (target, mask))
    return float(total / count)


def test_registered_and_finetuned(experts):
    assert NAME in list_task_types()
    for t in TASKS:
        assert experts["errors"][t] < 0.8 * _zero_error(t), (t, experts["errors"][t], _zero_error(t))


def test_merged_evaluation_matches_a_direct_computation(experts, tmp_path):
    lam = 0.5
    report = MultiTaskReport(out_dir=str(tmp_path), plot=False)
    m = MergedEvaluation(_encoder(experts), TASKS, heads=experts["heads"], store=str(experts["store"]),
                         method="task_arithmetic", method_options={"scaling": lam}, task_types={t: NAME for t in TASKS})
    trainer = _trainer(callbacks=[report])
    trainer.test(m, ToyMaps(), verbose=False)
    with TaskVectorStore(experts["store"]) as st:
        merged = {k: v + lam * sum(st.task_vector(t, k, v) for t in TASKS) if k in st.keys else v
                  for k, v in experts["pre"].items()}
    enc = ConvEncoder()
    enc.load_state_dict(merged)
    for t in TASKS:
        x, target, mask = ToyMaps().split(t, "test").tensors
        with torch.no_grad():
            total, count = abs_err_sums(experts["heads"][t](enc(x)), (target, mask))
        assert m.results[t] == pytest.approx(float(total / count), rel=1e-5)
        assert float(trainer.callback_metrics[f"test/abs_err/{t}"]) == pytest.approx(m.results[t])
    assert m.metric_names == ["abs_err"] and m.sample_counts == {t: 32 for t in TASKS}
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["metrics"] == ["abs_err"] and set(saved["values"]["abs_err"]) == {*TASKS, "avg"}
    assert "abs_err |" in (tmp_path / "report.md").read_text()            # not shown as a percentage


@pytest.mark.parametrize("checkpoint_tasks", [True, False])
def test_adamerging_on_maps(experts, checkpoint_tasks):
    m = AdaMerging(_encoder(experts), str(experts["store"]), TASKS, heads=experts["heads"], granularity="layer",
                   lr=0.05, task_types=NAME, checkpoint_tasks=checkpoint_tasks)
    dm = ToyMaps()
    batch = {t: (torch.arange(8), dm.split(t, "test").tensors[0][:8]) for t in TASKS}
    with torch.no_grad():
        before = float(m.adaptation_loss(batch))
    trainer = _trainer(max_steps=4)
    trainer.fit(m, dm)
    assert not torch.allclose(m.coefficients, torch.full_like(m.coefficients, 0.3))
    with torch.no_grad():
        assert float(m.adaptation_loss(batch)) < before
    trainer.test(m, dm, verbose=False)
    assert set(m.results) == {*TASKS, "avg"}
    preds = trainer.predict(m, dm)
    assert [p[0]["task"] for p in preds] == TASKS
    assert all(p[0]["preds"].shape == (16, 1, 12, 12) for p in preds)


def test_tinting_caches_maps_and_per_pixel_confidences(experts):
    m = Tinting(_encoder(experts), str(experts["store"]), TASKS, heads=experts["heads"], task_types=NAME,
                step_mode="joint", lr=1e-2)
    heads = [p.detach().clone() for p in m.model.heads.parameters()]
    trainer = _trainer(max_steps=2)
    trainer.fit(m, ToyMaps())
    for t in TASKS:
        assert m.expert_targets[t].shape == (32, 1, 12, 12) and m.expert_conf[t].shape == (32, 12, 12)
    assert 0 < float(trainer.callback_metrics["train/kept"]) <= 1
    assert any(not torch.equal(a, b) for a, b in zip(m.model.heads.parameters(), heads))   # the decoders tinted
    trainer.test(m, ToyMaps(), verbose=False)
    assert set(m.results) == {*TASKS, "avg"}


def test_surgery_edits_feature_maps(experts):
    m = Surgery(_encoder(experts), str(experts["store"]), TASKS, heads=experts["heads"], method="task_arithmetic",
                task_types=NAME, rank=4, lr=1e-2)
    trainer = _trainer(max_steps=3)
    trainer.fit(m, ToyMaps())
    assert m.expert_features["blur"].shape == (32, 8, 12, 12)
    assert any(a.up.weight.abs().sum() > 0 for a in m.adapters)
    trainer.test(m, ToyMaps(), verbose=False)
    assert set(m.results) == {*TASKS, "avg"}
