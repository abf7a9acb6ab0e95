"""Representation Surgery: zero-initialised start, expert features cached once, only the surgery
modules train, the L1 gap to the experts shrinks and accuracy improves on ToyTasks."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from tvq_lightning.data import ToyTasks
from tvq_lightning.errors import TvqError
from tvq_lightning.modules import surgery as surgery_mod
from tvq_lightning.modules.adamerging import AdaMerging
from tvq_lightning.modules.evaluate import MergedEvaluation
from tvq_lightning.modules.surgery import Surgery, SurgeryAdapter
from tvq_lightning.store import TaskVectorStore, load_state_dict
from tvq_lightning.testing import TinyEncoder

from _adapt_setup import trainer  # noqa: E402

TASKS = ["a", "b"]  # the tasks of the shared ``assets`` fixture (conftest.py)


def _dm(**kw) -> ToyTasks:
    return ToyTasks(tasks=TASKS, batch_size=32, **kw)


def _kw(assets) -> dict:
    return dict(heads_dir=str(assets["heads_dir"]), pretrained=str(assets["pretrained"]), store=str(assets["store"]))


def _trainer(**kw) -> pl.Trainer:
    return trainer(**kw, limit_val_batches=0)


def test_adapter_starts_as_identity():
    a = SurgeryAdapter(8, rank=3)
    z = torch.randn(5, 8)
    assert torch.equal(a(z), z)
    assert a.down.weight.shape == (3, 8) and a.up.weight.shape == (8, 3) and a.up.weight.abs().sum() == 0


def _expert_features(assets, task, images):
    pre = load_state_dict(assets["pretrained"])
    with TaskVectorStore(assets["store"]) as st:
        tau = st.task_state_dict(task, pre)
    enc = TinyEncoder(width=32, depth=1)
    enc.load_state_dict({k: v.float() + tau[k] if k in tau else v for k, v in pre.items()})
    with torch.no_grad():
        return enc.eval()(images)


def test_surgery_on_task_arithmetic(assets, monkeypatch):
    calls = []
    real = surgery_mod.expert_outputs
    monkeypatch.setattr(surgery_mod, "expert_outputs", lambda *a, **k: calls.append(1) or real(*a, **k))
    dm = _dm()
    ta = MergedEvaluation(TinyEncoder(width=32, depth=1), TASKS, method="task_arithmetic", **_kw(assets))
    _trainer().test(ta, dm, verbose=False)
    m = Surgery(TinyEncoder(width=32, depth=1), tasks=TASKS, method="task_arithmetic", lr=5e-3, **_kw(assets))
    _trainer().test(m, dm, verbose=False)
    assert m.results == ta.results                       # U = 0: exactly the merged model
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        f"adapters.{i}.{w}.weight" for i in range(len(TASKS)) for w in ("down", "up")}
    enc = {k: v.detach().clone() for k, v in m.model.encoder.state_dict().items()}
    heads = [p.detach().clone() for p in m.model.heads.parameters()]

    images = {t: dm.split(t, "test").tensors[0] for t in TASKS}
    batch = {t: (torch.arange(64), images[t][:64]) for t in TASKS}
    trainer = _trainer(max_steps=60)
    trainer.fit(m, dm)
    assert m.expert_passes == 1 and len(calls) == len(TASKS)   # expert features computed once, per task
    for t in TASKS:
        assert torch.allclose(m.expert_features[t], _expert_features(assets, t, images[t]), atol=1e-5)
    _trainer().test(m, dm, verbose=False)
    assert m.results["avg"] > ta.results["avg"] + 0.05, (m.results, ta.results)
    with torch.no_grad():
        after = float(m.surgery_loss(batch))
        for a in m.adapters:
            a.up.weight.zero_()
        before = float(m.surgery_loss(batch))
    assert after < 0.8 * before, (before, after)
    assert all(torch.equal(v, enc[k]) for k, v in m.model.encoder.state_dict().items())  # merged encoder frozen
    assert all(torch.equal(a, b) for a, b in zip(m.model.heads.parameters(), heads))


def test_surgery_on_adamerging_coefficients_and_merged_file(assets, tmp_path):
    dm = _dm()
    ada = AdaMerging(TinyEncoder(width=32, depth=1), tasks=TASKS, granularity="layer",
                     coefficients_out=str(tmp_path / "c.safetensors"), **_kw(assets))
    _trainer(max_steps=2).fit(ada, dm)
    _trainer().test(ada, dm, verbose=False)
    m = Surgery(TinyEncoder(width=32, depth=1), tasks=TASKS, coefficients=str(tmp_path / "c.safetensors"),
                rank=4, **_kw(assets))
    _trainer().test(m, dm, verbose=False)
    assert m.results == pytest.approx(ada.results)       # starts from AdaMerging's merge exactly
    _trainer(max_steps=3).fit(m, dm)
    assert m.adapters[0].down.weight.shape == (4, 32)
    assert any(a.up.weight.abs().sum() > 0 for a in m.adapters)

    # a merged state dict file; the caller's encoder (theta_0) is neither modified nor needed twice
    from tvq_lightning.merging.engine import merge_state_dict
    from tvq_lightning.merging.registry import create_merger
    from tvq_lightning.testing import save_safetensors

    pre = load_state_dict(assets["pretrained"])
    merged = merge_state_dict(str(assets["store"]), pre, create_merger("task_arithmetic"), tasks=TASKS)
    save_safetensors(merged, tmp_path / "merged.safetensors")
    enc = TinyEncoder(width=32, depth=1)
    enc.load_state_dict(pre)
    m3 = Surgery(enc, str(assets["store"]), TASKS, heads_dir=str(assets["heads_dir"]),
                 merged=str(tmp_path / "merged.safetensors"))
    _trainer(max_steps=2).fit(m3, dm)
    assert all(torch.equal(v, pre[k]) for k, v in enc.state_dict().items())


def test_surgery_errors(assets, tmp_path):
    with pytest.raises(TvqError, match="per-task"):
        Surgery(TinyEncoder(width=32, depth=1), tasks=TASKS, method="emr", **_kw(assets))
    other = TinyEncoder(width=32, depth=1)               # not the store's theta_0
    with pytest.raises(TvqError, match="fingerprint"):
        Surgery(other, str(assets["store"]), TASKS, heads_dir=str(assets["heads_dir"]), method="task_arithmetic")
    with pytest.raises(TvqError, match="rank"):
        Surgery(TinyEncoder(width=32, depth=1), tasks=TASKS, method="task_arithmetic", rank=0, **_kw(assets))
