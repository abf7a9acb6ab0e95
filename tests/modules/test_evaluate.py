"""MergedEvaluation: every merge source, per-task artifacts, metrics and the errors users see."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import _adapt_setup as A
from tvq_lightning.errors import FingerprintMismatch, TvqError
from tvq_lightning.merging import plan_merge, write_merged, write_per_task
from tvq_lightning.merging.output import export_task_model
from tvq_lightning.modules.evaluate import MergedEvaluation
from tvq_lightning.store import StoreConfig, quantize_to_store
from tvq_lightning.testing import synthetic_finetunes, tiny_pretrained


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return A.build(tmp_path_factory.getbasetemp() / "adapt-modules")


def _test(module, **dm):
    trainer = A.trainer()
    trainer.test(module, datamodule=A.datamodule(**dm), verbose=False)
    return trainer


def test_method_merged_file_and_heads_dir_agree(setup, tmp_path):
    store = str(setup.stores["tvq"])
    by_method = MergedEvaluation(setup.encoder(), A.TASKS, heads=setup.heads, store=store, method="task_arithmetic",
                                 method_options={"scaling": 0.3})
    trainer = _test(by_method)
    assert set(by_method.results) == set(A.TASKS) | {"avg"}
    assert by_method.sample_counts == {t: 48 for t in A.TASKS} == by_method.local_sample_counts
    for t in A.TASKS + ["avg"]:
        assert float(trainer.callback_metrics[f"test/acc/{t}"]) == pytest.approx(by_method.results[t])
    assert by_method.results["avg"] == pytest.approx(sum(by_method.results[t] for t in A.TASKS) / 3)
    merged = tmp_path / "ta.safetensors"
    write_merged(plan_merge(store, setup.pre, "task_arithmetic", scaling=0.3), merged)
    enc = setup.encoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    by_file = MergedEvaluation(enc, A.TASKS, heads_dir=str(setup.heads_dir), merged=str(merged))
    _test(by_file)
    assert by_file.results == by_method.results
    assert all(torch.equal(v, before[k]) for k, v in enc.state_dict().items())   # the caller's encoder is untouched


def test_per_task_method_and_artifact(setup, tmp_path):
    store = str(setup.stores["tvq"])
    by_method = MergedEvaluation(setup.encoder(), A.TASKS, heads=setup.heads, store=store, method="emr", per_task=True)
    _test(by_method)
    art = tmp_path / "emr"
    write_per_task(plan_merge(store, setup.pre, "emr"), art)
    by_art = MergedEvaluation(setup.encoder(), A.TASKS, heads=setup.heads, merged=str(art))
    _test(by_art)
    assert by_art.results == by_method.results
    # dataloader i really is evaluated with task i's model
    export_task_model(art, "b", setup.pre, tmp_path / "b.safetensors")
    only_b = MergedEvaluation(setup.encoder(), A.TASKS, heads=setup.heads, merged=str(tmp_path / "b.safetensors"))
    _test(only_b)
    assert only_b.results["b"] == by_art.results["b"]
    with pytest.raises(TvqError, match="per_task=False"):
        MergedEvaluation(setup.encoder(), A.TASKS, heads=setup.heads, merged=str(art), per_task=False)


def test_validate_logs_val_metrics(setup):
    m = MergedEvaluation(setup.encoder(), A.TASKS, heads=setup.heads, store=str(setup.stores["fp32"]), method="ties")
    trainer = A.trainer()
    trainer.validate(m, datamodule=A.datamodule(), verbose=False)
    assert set(m.val_results) == set(A.TASKS) | {"avg"} and "val/acc/avg" in trainer.callback_metrics


def test_heads_and_tasks_must_agree(setup, tmp_path):
    store = str(setup.stores["tvq"])
    kw = dict(store=store, method="task_arithmetic")
    with pytest.raises(TvqError, match="no head for 'c'"):
        MergedEvaluation(setup.encoder(), A.TASKS, heads={t: setup.heads[t] for t in "ab"}, **kw)
    with pytest.raises(TvqError, match="head 'z' is not a task"):
        MergedEvaluation(setup.encoder(), A.TASKS, heads={**setup.heads, "z": setup.heads["a"]}, **kw)
    with pytest.raises(TvqError, match="does not exist"):
        MergedEvaluation(setup.encoder(), A.TASKS, heads_dir=str(tmp_path), **kw)
    with pytest.raises(TvqError, match="exactly one of method"):
        MergedEvaluation(setup.encoder(), A.TASKS, heads=setup.heads, store=store)


def test_head_classes_must_match_datamodule(setup):
    m = MergedEvaluation(setup.encoder(), A.TASKS, heads=setup.heads, store=str(setup.stores["tvq"]), method="task_arithmetic")
    with pytest.raises(TvqError, match="has 4 classes but the datamodule.s task .a. gives 5"):
        _test(m, num_classes=5)
    with pytest.raises(TvqError, match="datamodule's tasks"):
        A.trainer().test(m, datamodule=A.datamodule(tasks=["b", "a", "c"]), verbose=False)


def test_store_of_other_pretrained_weights(setup, tmp_path):
    other = {k: v.detach().clone() for k, v in tiny_pretrained(1, width=32, depth=1).state_dict().items()}
    path = tmp_path / "other"
    quantize_to_store(other, dict(zip(A.TASKS, synthetic_finetunes(other, 3))), path, StoreConfig("tvq"), progress=False)
    with pytest.raises(FingerprintMismatch):
        MergedEvaluation(setup.encoder(), A.TASKS, heads=setup.heads, store=str(path), method="task_arithmetic")


def _coeff_file(path, values, tasks, keys, granularity, fingerprint):
    meta = {"format": "tvq_lightning.adamerging_coefficients", "version": 1, "tasks": tasks, "keys": keys,
            "granularity": granularity, "plus": False, "ties_k": 0.2, "fingerprint": fingerprint}
    save_file({"coefficients": values}, str(path), metadata={"tvq": json.dumps(meta)})
    return str(path)


def test_coefficient_file_errors(setup, tmp_path):
    from tvq_lightning.store import TaskVectorStore

    st = TaskVectorStore(setup.stores["tvq"])
    fp, keys = st.fingerprint, st.keys
    kw = dict(heads=setup.heads, store=str(setup.stores["tvq"]))
    bad = _coeff_file(tmp_path / "bad.safetensors", torch.zeros(4), A.TASKS, keys, "task", fp)
    with pytest.raises(TvqError, match=r"shape \(4,\) disagree with its 3 tasks"):
        MergedEvaluation(setup.encoder(), A.TASKS, coefficients=bad, **kw)
    few = _coeff_file(tmp_path / "few.safetensors", torch.zeros(2, 3), A.TASKS, keys[:2], "layer", fp)
    with pytest.raises(TvqError, match=r"do not fit store .* \(expected \(%d, 3\)" % len(keys)):
        MergedEvaluation(setup.encoder(), A.TASKS, coefficients=few, **kw)
    other = _coeff_file(tmp_path / "fp.safetensors", torch.zeros(3), A.TASKS, keys, "task", "tvq1:" + "0" * 64)
    with pytest.raises(FingerprintMismatch):
        MergedEvaluation(setup.encoder(), A.TASKS, coefficients=other, **kw)
    wrong_tasks = _coeff_file(tmp_path / "t.safetensors", torch.zeros(2), ["a", "b"], keys, "task", fp)
    with pytest.raises(TvqError, match="the coefficients are for tasks"):
        MergedEvaluation(setup.encoder(), A.TASKS, coefficients=wrong_tasks, **kw)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(TvqError, match="not a readable coefficient file"):
        MergedEvaluation(setup.encoder(), A.TASKS, coefficients=str(tmp_path / "junk.safetensors"), **kw)
    ok = _coeff_file(tmp_path / "ok.safetensors", torch.full((3,), 0.3), A.TASKS, keys, "task", fp)
    m = MergedEvaluation(setup.encoder(), A.TASKS, coefficients=ok, **kw)
    ta = MergedEvaluation(setup.encoder(), A.TASKS, method="task_arithmetic", **kw)
    _test(m), _test(ta)
    assert m.results == pytest.approx(ta.results, abs=1 / 48 + 1e-9)


def test_tasks_default_to_the_sources(setup, tmp_path):
    m = MergedEvaluation(setup.encoder(), heads_dir=str(setup.heads_dir), store=str(setup.stores["tvq"]), method="ties")
    assert m.tasks == A.TASKS
    art = tmp_path / "tall"
    write_per_task(plan_merge(str(setup.stores["tvq"]), setup.pre, "tall"), art)
    assert MergedEvaluation(setup.encoder(), heads_dir=str(setup.heads_dir), merged=str(art)).tasks == A.TASKS
    merged = tmp_path / "m.safetensors"
    write_merged(plan_merge(str(setup.stores["tvq"]), setup.pre, "weight_averaging"), merged)
    assert MergedEvaluation(setup.encoder(), heads=setup.heads, merged=str(merged)).tasks == A.TASKS
    with pytest.raises(TvqError, match="pass tasks"):
        MergedEvaluation(setup.encoder(), heads_dir=str(setup.heads_dir), merged=str(merged))
