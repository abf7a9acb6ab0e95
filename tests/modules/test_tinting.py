"""Model Tinting / Tinting++: the confidence rule, expert pseudo-labels cached once, skipped steps,
a short run beating task arithmetic on ToyTasks, and identical ranks under 2-process DDP."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from tvq_lightning.data import ToyTasks
from tvq_lightning.errors import TvqError
from tvq_lightning.models.heads import ClassificationHead
from tvq_lightning.modules import tinting as tinting_mod
from tvq_lightning.modules.evaluate import MergedEvaluation
from tvq_lightning.modules.tinting import Tinting
from tvq_lightning.store import TaskVectorStore, load_state_dict
from tvq_lightning.tasks import create_task_type
from tvq_lightning.testing import TinyEncoder

from _adapt_setup import trainer  # noqa: E402

TASKS = ["a", "b"]  # the tasks of the shared ``assets`` fixture (conftest.py)


def _dm(**kw) -> ToyTasks:
    return ToyTasks(tasks=TASKS, batch_size=32, **kw)


def _tinting(assets, **kw) -> Tinting:
    return Tinting(TinyEncoder(width=32, depth=1), str(assets["store"]), TASKS, heads_dir=str(assets["heads_dir"]),
                   pretrained=str(assets["pretrained"]), **kw)


def _trainer(**kw) -> pl.Trainer:
    return trainer(**kw)


# (c_e, y_e, c_m, y_m) -> kept?
CASES = [
    (0.9, 1, 0.5, 1, True),     # agree, expert confident
    (0.2, 1, 0.9, 1, True),     # agree, expert unsure: still kept
    (0.9, 1, 0.5, 2, True),     # disagree, expert more confident
    (0.5, 1, 0.5, 2, True),     # disagree, equally confident (c_e >= c_m)
    (0.4, 1, 0.6, 2, False),    # disagree, merged model more confident
    (0.1, 0, 0.99, 3, False),
]


def test_confidence_rule_on_crafted_samples():
    c_e, y_e, c_m, y_m, want = (torch.tensor(col) for col in zip(*CASES))
    assert create_task_type("classification").keep_where(y_e, c_e, y_m, c_m).tolist() == want.tolist()


@pytest.mark.parametrize("sampling", [True, False])
def test_task_loss_drops_exactly_the_rule_s_samples(assets, sampling):
    m = _tinting(assets, confidence_sampling=sampling)
    n = len(CASES)
    c_e, y_e, c_m, y_m, want = (torch.tensor(col) for col in zip(*CASES))
    # merged logits whose softmax has max prob c_m at class y_m (4 classes)
    probs = torch.stack([torch.full((4,), (1 - c) / 3) for c in c_m.tolist()])
    probs[torch.arange(n), y_m] = c_m.float()
    logits = probs.log().requires_grad_(True)
    idx = torch.arange(n) + 10                    # the cache is looked up by sample index
    m.expert_targets = {"a": torch.zeros(20, dtype=torch.long), "b": torch.zeros(20, dtype=torch.long)}
    m.expert_conf = {"a": torch.zeros(20), "b": torch.zeros(20)}
    m.expert_targets["a"][idx], m.expert_conf["a"][idx] = y_e, c_e.float()
    m.tinted_outputs = lambda images, i, params: logits
    loss, kept, seen = m.task_loss({"a": (idx, torch.zeros(n, 3, 32, 32))}, 0, {})
    keep = want if sampling else torch.ones(n, dtype=torch.bool)
    assert (kept, seen) == (int(keep.sum()), n)
    assert torch.allclose(loss, F.cross_entropy(logits[keep], y_e[keep]))
    loss.backward()
    assert logits.grad[~keep].abs().sum() == 0 and logits.grad[keep].abs().sum() > 0


def _independent_expert(assets, task: str, images: torch.Tensor):
    pre = load_state_dict(assets["pretrained"])
    with TaskVectorStore(assets["store"]) as st:
        tau = st.task_state_dict(task, pre)
    enc = TinyEncoder(width=32, depth=1)
    enc.load_state_dict({k: (v.float() + tau[k]) if k in tau else v for k, v in pre.items()})
    head = ClassificationHead.load(assets["heads_dir"] / f"{task}.safetensors")
    with torch.no_grad():
        return head(enc.eval()(images)).softmax(-1).max(-1)


def test_pseudo_labels_cached_once(assets, monkeypatch):
    calls = []
    real = tinting_mod.expert_outputs
    monkeypatch.setattr(tinting_mod, "expert_outputs", lambda *a, **k: calls.append(1) or real(*a, **k))
    m, dm = _tinting(assets), _dm()
    settings = lambda: {k: v for k, v in vars(dm).items() if not k.startswith("_") and k != "trainer"}  # noqa: E731
    state = settings()
    seen = []
    real_split = tinting_mod.split_batch
    monkeypatch.setattr(tinting_mod, "split_batch", lambda b, t, n, tt: seen.append(b[t][0]) or real_split(b, t, n, tt))
    _trainer(max_steps=6).fit(m, dm)
    assert seen and all(i.dtype == torch.long for i in seen)   # (index, image) batches while fitting ...
    assert settings() == state and not hasattr(dm, "train_indices")   # ... without changing the datamodule
    assert m.expert_passes == 1 and len(calls) == len(TASKS)      # one pass per task, then lookups only
    _trainer(max_steps=4).fit(m, dm)                    # fitting again reuses the cache
    assert m.expert_passes == 1 and len(calls) == len(TASKS)
    for t in TASKS:
        images = dm.split(t, "test").tensors[0]
        conf, labels = _independent_expert(assets, t, images)
        assert m.expert_targets[t].shape == (len(images),)
        assert torch.equal(m.expert_targets[t], labels)
        assert torch.allclose(m.expert_conf[t], conf, atol=1e-5)


def test_joint_head_tint_shares_one_encoder_pass(assets):
    """Joint steps with head tints run every task's images through one (streamed) encoder pass:
    the same losses and gradients as one forward per task through one merge."""
    m, dm, n = _tinting(assets, step_mode="joint"), _dm(), 8
    m.expert_targets = {t: torch.arange(n) % 4 for t in TASKS}
    m.expert_conf = {t: torch.linspace(0.2, 1.0, n) for t in TASKS}
    batch = {t: (torch.arange(n), dm.split(t, "test").tensors[0][:n]) for t in TASKS}
    params = [m.coefficients, *m.tint_parameters()]
    order = [1, 0]
    shared = m._joint_losses(batch, order)
    merged = m.merged_params()
    separate = [m.task_loss(batch, i, merged) for i in order]
    assert [p[1:] for p in shared] == [p[1:] for p in separate] and shared[0][1] > 0
    for a, b in zip(shared, separate):
        assert torch.allclose(a[0], b[0], atol=1e-6)
    g_shared = torch.autograd.grad(sum(p[0] for p in shared), params)
    g_separate = torch.autograd.grad(sum(p[0] for p in separate), params)
    for a, b in zip(g_shared, g_separate):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("step_mode", ["task", "joint"])
def test_step_skipped_when_nothing_is_kept(assets, step_mode):
    m = _tinting(assets, step_mode=step_mode)
    n = len(_dm().split("a", "test"))
    # labels no prediction can match and a confidence below any softmax maximum: nothing is kept
    m.expert_targets = {t: torch.full((n,), -1) for t in TASKS}
    m.expert_conf = {t: torch.full((n,), -1.0) for t in TASKS}
    coeffs, heads = m.coefficients.detach().clone(), [p.detach().clone() for p in m.model.heads.parameters()]
    trainer = _trainer(max_epochs=1, limit_train_batches=3)
    trainer.fit(m, _dm())
    assert trainer.global_step == 0 and not trainer.optimizers[0].state
    assert torch.equal(m.coefficients, coeffs)
    assert all(torch.equal(a, b) for a, b in zip(m.model.heads.parameters(), heads))
    assert m.expert_passes == 0                         # a filled cache is never recomputed
    assert float(trainer.callback_metrics["train/kept"]) == 0.0


def test_beats_task_arithmetic_and_saves(assets, tmp_path):
    dm = _dm()
    ta = MergedEvaluation(TinyEncoder(width=32, depth=1), TASKS, heads_dir=str(assets["heads_dir"]),
                          store=str(assets["store"]), pretrained=str(assets["pretrained"]), method="task_arithmetic")
    _trainer().test(ta, dm, verbose=False)
    heads = {t: ClassificationHead.load(assets["heads_dir"] / f"{t}.safetensors") for t in TASKS}
    given = {t: h.weight.detach().clone() for t, h in heads.items()}
    m = Tinting(TinyEncoder(width=32, depth=1), str(assets["store"]), TASKS, heads=heads,
                pretrained=str(assets["pretrained"]), coefficients_out=str(tmp_path / "c.safetensors"),
                heads_out=str(tmp_path / "heads"))
    trainer = _trainer(max_steps=20)
    trainer.fit(m, dm)
    assert trainer.global_step == 20                    # max_steps counts optimizer steps (one per task)
    trainer.test(m, dm, verbose=False)
    assert m.results["avg"] > ta.results["avg"] + 0.05, (m.results, ta.results)
    assert all(torch.equal(heads[t].weight, given[t]) for t in TASKS)      # the caller's heads are untouched
    assert m.coefficients.shape == (len(m.packed.keys), len(TASKS))        # layer-wise by default
    # the saved coefficients + tinted heads reproduce the result without training
    ev = MergedEvaluation(TinyEncoder(width=32, depth=1), TASKS, heads_dir=str(tmp_path / "heads"),
                          store=str(assets["store"]), pretrained=str(assets["pretrained"]),
                          coefficients=str(tmp_path / "c.safetensors"))
    _trainer().test(ev, dm, verbose=False)
    assert ev.results == pytest.approx(m.results)


def test_block_tint(assets):
    m = _tinting(assets, tint="block:blocks.0", step_mode="joint")
    heads = [p.detach().clone() for p in m.model.heads.parameters()]
    enc = {k: v.detach().clone() for k, v in m.model.encoder.state_dict().items()}
    assert all(not p.requires_grad for p in m.model.parameters())
    assert {n for n, _ in m.named_parameters() if _.requires_grad} == {"coefficients"} | {
        f"deltas.{i}.{k}" for i in range(len(TASKS)) for k in m.deltas[i].keys()}
    trainer = _trainer(max_steps=3)
    trainer.fit(m, _dm())
    trainer.test(m, _dm(), verbose=False)
    assert any(p.abs().sum() > 0 for p in m.deltas.parameters())
    assert all(torch.equal(a, b) for a, b in zip(m.model.heads.parameters(), heads))
    assert all(torch.equal(v, enc[k]) for k, v in m.model.encoder.state_dict().items())
    assert 0.0 <= m.results["avg"] <= 1.0


def test_bad_tint_options(assets):
    with pytest.raises(TvqError, match="no submodule 'nope'"):
        _tinting(assets, tint="block:nope")
    with pytest.raises(TvqError, match="tint='layer'"):
        _tinting(assets, tint="layer")
    with pytest.raises(TvqError, match="unset data.train_task"):
        _trainer(max_steps=1).fit(_tinting(assets), _dm(train_task="a"))


@pytest.mark.slow
def test_ddp_ranks_stay_identical(assets, tmp_path):
    """2-process gloo DDP: after a few steps the coefficients and the tinted layer (per-task heads with
    one step per task; a block correction with joint steps) are identical on both ranks."""
    script = Path(__file__).with_name("_ddp_tinting_script.py")
    proc = subprocess.run([sys.executable, str(script), str(assets["store"].parent), str(tmp_path)], capture_output=True,
                          text=True, timeout=150, cwd=script.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("rank*.json"))]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    for run in ("head", "block"):
        r0, r1 = ranks[0][run], ranks[1][run]
        assert r0["steps"] == r1["steps"] == 4
        c0 = torch.tensor(r0["coefficients"])
        assert torch.equal(c0, torch.tensor(r1["coefficients"]))
        assert not torch.allclose(c0, torch.full_like(c0, 0.3))                  # the coefficients moved
        assert len(r0["tinted"]) == len(r1["tinted"]) > 0
        assert all(torch.equal(torch.tensor(a), torch.tensor(b)) for a, b in zip(r0["tinted"], r1["tinted"]))
    assert any(any(v != 0 for v in p) for p in ranks[0]["block"]["tinted"])      # the block correction trained
