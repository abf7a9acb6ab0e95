"""AdaMerging on packed task vectors: gradient parity with fp32, adaptation, coefficient files, DDP."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _adapt_setup as A
from tvq_lightning.errors import TvqError
from tvq_lightning.modules.adamerging import AdaMerging, read_coefficients
from tvq_lightning.modules.evaluate import MergedEvaluation
from tvq_lightning.store import StoreConfig, TaskVectorStore, quantize_to_store

SCRIPT = Path(__file__).with_name("_ddp_adapt_script.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return A.build(tmp_path_factory.getbasetemp() / "adapt-modules")


def _batch(n=16):
    dm = A.datamodule()
    return {t: dm.split(t, "test").tensors[0][:n] for t in A.TASKS}


def _fp32_from_dequantized(setup, scheme, out: Path) -> Path:
    """An fp32 store whose task vectors are the quantized store's dequantized ones (theta0 + tau_hat)."""
    st = TaskVectorStore(setup.stores[scheme])
    fts = {t: {k: (v + st.task_vector(t, k)) if k in st.keys else v.clone() for k, v in setup.pre.items()} for t in st.tasks}
    quantize_to_store(setup.pre, fts, out, StoreConfig("fp32"), progress=False)
    return out


@pytest.mark.parametrize("scheme", ["tvq", "rtvq"])
@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_quantized_step_equals_fp32_step_on_dequantized(setup, tmp_path, scheme, granularity):
    """(b) one step's coefficient gradients: quantized store == fp32 store of the dequantized vectors."""
    fp32 = _fp32_from_dequantized(setup, scheme, tmp_path / "fp32")
    grads = []
    for store in (setup.stores[scheme], fp32):
        m = AdaMerging(setup.encoder(), str(store), heads=setup.heads, granularity=granularity)
        m.adaptation_loss(_batch()).backward()
        grads.append(m.coefficients.grad.clone())
    assert bool(grads[0].ne(0).any())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity,plus", [("task", False), ("layer", True)])
def test_streamed_step_equals_one_merge_step(setup, granularity, plus):
    """checkpoint_tasks=True (one pass over all tasks, merged block by block) gives the loss and the
    coefficient gradients of checkpoint_tasks=False (one whole merge, one forward per task)."""
    out = []
    for streamed in (True, False):
        m = AdaMerging(setup.encoder(), str(setup.stores["rtvq"]), heads=setup.heads, granularity=granularity,
                       plus=plus, checkpoint_tasks=streamed)
        loss = m.adaptation_loss(_batch())
        loss.backward()
        out.append((loss.detach(), m.coefficients.grad.clone()))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-6, atol=1e-6)
    assert bool(out[0][1].ne(0).any())
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("granularity,plus", [("task", False), ("layer", False), ("task", True), ("layer", True)])
def test_adaptation_lowers_entropy_and_moves_coefficients(setup, granularity, plus):
    """(c) a few Adam steps on the CombinedLoader lower the summed entropy."""
    m = AdaMerging(setup.encoder(), str(setup.stores["tvq"]), heads=setup.heads, granularity=granularity, plus=plus, lr=1e-2)
    batch = _batch(48)
    with torch.no_grad():
        before = float(m.adaptation_loss(batch))
    A.trainer(max_steps=8).fit(m, datamodule=A.datamodule())
    with torch.no_grad():
        after = float(m.adaptation_loss(batch))
    assert after < before
    assert not torch.allclose(m.coefficients.detach(), torch.full_like(m.coefficients, 0.3))
    lam = m.lambdas().detach()
    assert float(lam.min()) >= 0 and float(lam.max()) <= 1


@pytest.mark.parametrize("granularity,plus", [("layer", False), ("task", True)])
def test_saved_coefficients_reproduce_accuracy_exactly(setup, tmp_path, granularity, plus):
    """(d) MergedEvaluation with the saved coefficients gives the trained run's accuracy exactly."""
    out = tmp_path / "coeffs.safetensors"
    m = AdaMerging(setup.encoder(), str(setup.stores["rtvq"]), heads=setup.heads, granularity=granularity, plus=plus,
                   lr=1e-2, coefficients_out=str(out))
    A.trainer(max_steps=5).fit(m, datamodule=A.datamodule())
    A.trainer().test(m, datamodule=A.datamodule(), verbose=False)
    c = read_coefficients(out)
    assert torch.equal(c.values, m.lambdas().detach())
    assert (c.granularity, c.plus, c.tasks) == (granularity, plus, A.TASKS)
    assert json.loads(out.with_suffix(".json").read_text())["granularity"] == granularity
    ev = MergedEvaluation(setup.encoder(), A.TASKS, heads_dir=str(setup.heads_dir), store=str(setup.stores["rtvq"]),
                          coefficients=str(out))
    A.trainer().test(ev, datamodule=A.datamodule(), verbose=False)
    assert ev.results == m.results and ev.sample_counts == m.sample_counts
    fresh = AdaMerging(setup.encoder(), str(setup.stores["rtvq"]), heads=setup.heads, granularity=granularity, plus=plus)
    fresh.load_coefficients(out)
    A.trainer().test(fresh, datamodule=A.datamodule(), verbose=False)
    assert fresh.results == m.results
    other = AdaMerging(setup.encoder(), str(setup.stores["rtvq"]), heads=setup.heads,
                       granularity="task" if granularity == "layer" else "layer", plus=plus)
    with pytest.raises(TvqError, match="do not fit this"):
        other.load_coefficients(out)


def test_memory_and_ddp_layout(setup):
    """(e) packed uint8 codes only; the coefficients are the sole trainable parameter; DDP ignores the codes."""
    st = TaskVectorStore(setup.stores["tvq"])
    m = AdaMerging(setup.encoder(), str(setup.stores["tvq"]), heads=setup.heads, granularity="layer")
    numel = {k: torch.Size(st.layout.keys[k].shape).numel() for k in st.keys}
    for name, b in m.packed.named_buffers():
        key = st.keys[int(name.split("_")[0][1:])]
        if st.layout.keys[key].quantized and "_t" in name:
            assert not (b.is_floating_point() and b.numel() == numel[key]), name
            if name.endswith("_q"):
                assert b.dtype == torch.uint8
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["coefficients"]
    assert m.coefficients.shape == (len(st.keys), 3)
    assert sorted(m._ddp_params_and_buffers_to_ignore) == sorted(f"packed.{n}" for n, _ in m.packed.named_buffers())
    assert not [k for k in m.state_dict() if k.startswith("packed.")]
    quantized = sum(numel[k] for k in st.keys if st.layout.keys[k].quantized)
    assert m.packed.nbytes() < 4 * 3 * quantized / 5
    m.train()
    assert not m.model.training                  # frozen networks stay in eval mode


def test_bad_batch_and_granularity(setup):
    with pytest.raises(TvqError, match="granularity"):
        AdaMerging(setup.encoder(), str(setup.stores["tvq"]), heads=setup.heads, granularity="block")
    m = AdaMerging(setup.encoder(), str(setup.stores["tvq"]), heads=setup.heads)
    with pytest.raises(TvqError, match="no images for task 'c'"):
        m.training_step({t: v for t, v in _batch().items() if t != "c"}, 0)


@pytest.fixture(scope="module")
def ddp_ranks(setup, tmp_path_factory) -> list[dict]:
    """One 2-process gloo DDP launch of _ddp_adapt_script.py (evaluation, then AdaMerging)."""
    out = tmp_path_factory.mktemp("ddp")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(setup.root), str(out)], capture_output=True, text=True,
                          timeout=150, cwd=SCRIPT.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(out.glob("rank*.json"))
    assert len(files) == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    return [json.loads(f.read_text()) for f in files]


@pytest.mark.slow
def test_ddp_evaluation_counts_every_sample_once(setup, ddp_ranks):
    """(g) 2-process gloo DDP: per-task counts sum to the dataset size; accuracy equals 1 process."""
    ranks = ddp_ranks
    import _ddp_adapt_script as S

    ref = S.evaluation(setup)
    A.trainer().test(ref, datamodule=A.ToyTasks(**S.EVAL_DM), verbose=False)
    n = S.EVAL_DM["test_size"]
    for r in ranks:
        assert r["world"] == 2
        assert r["sample_counts"] == {t: n for t in A.TASKS}
        assert r["results"] == ref.results
    assert {t: sum(r["local_sample_counts"][t] for r in ranks) for t in A.TASKS} == {t: n for t in A.TASKS}
    assert sorted(r["local_sample_counts"]["a"] for r in ranks) == [n // 2, n - n // 2]


@pytest.mark.slow
def test_ddp_adamerging_matches_one_process(setup, ddp_ranks):
    """(g) coefficients are identical on both ranks and equal the 1-process run on the same global batch."""
    ranks = ddp_ranks
    import _ddp_adapt_script as S

    ref = S.adamerging(setup)
    A.trainer(max_steps=S.STEPS).fit(ref, datamodule=A.datamodule(**{**S.ADA_DM, "batch_size": 2 * S.ADA_DM["batch_size"]}))
    c0, c1 = (torch.tensor(r["coefficients"]) for r in ranks)
    assert torch.equal(c0, c1)
    assert not torch.allclose(c0, torch.full_like(c0, 0.3))
    torch.testing.assert_close(c0, ref.lambdas().detach(), rtol=0, atol=1e-5)
