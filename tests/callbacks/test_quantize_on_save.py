"""QuantizeOnSave: the stored task vector is exactly the quantized (final - initial) weights."""
import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tvq_lightning.callbacks import QuantizeOnSave
from tvq_lightning.errors import TvqError
from tvq_lightning.quant.config import QuantSpec
from tvq_lightning.quant.policy import is_quantized
from tvq_lightning.quant.qtensor import QTensor
from tvq_lightning.store import TaskVectorStore, load_state_dict
from tvq_lightning.testing import save_safetensors


def expected(tau: torch.Tensor, key: str, bits: int = 4) -> torch.Tensor:
    if not is_quantized(key, tau.shape, torch.float32, "rank"):
        return tau
    return QTensor.quantize(tau, QuantSpec(bits)).dequantize()


def assert_stored(store: TaskVectorStore, task: str, tau: dict, bits: int = 4) -> None:
    for k, t in tau.items():
        assert torch.equal(store.task_vector(task, k), expected(t, k, bits)), k


def test_store_holds_quantized_task_vector(tmp_path, run):
    r = run("a", [QuantizeOnSave(str(tmp_path / "store"), save_pretrained=str(tmp_path / "pre.safetensors"))])
    store = TaskVectorStore(tmp_path / "store")
    assert store.tasks == ["a"] and store.config.label == "TVQ-INT4"
    tau = r.tau()
    assert any(t.abs().max() > 0 for t in tau.values())
    assert_stored(store, "a", tau)
    assert store.fingerprint == r.module.start_fingerprint
    pre = load_state_dict(tmp_path / "pre.safetensors")
    assert all(torch.equal(pre[k], v) for k, v in r.start.items())
    assert not list((tmp_path / "store").glob("*.ckpt"))  # no fp32 checkpoint is the artifact


def test_two_runs_add_two_tasks(tmp_path, run):
    ra = run("a", [QuantizeOnSave(str(tmp_path / "store"))])
    rb = run("b", [QuantizeOnSave(str(tmp_path / "store"))])
    store = TaskVectorStore(tmp_path / "store")
    assert store.tasks == ["a", "b"]
    assert_stored(store, "a", ra.tau())
    assert_stored(store, "b", rb.tau())


def test_existing_task_is_refused_early_or_replaced(tmp_path, run):
    run("a", [QuantizeOnSave(str(tmp_path / "store"))])
    run("b", [QuantizeOnSave(str(tmp_path / "store"))])
    with pytest.raises(TvqError, match="task 'a' is already in store .*overwrite_task"):
        run("a", [QuantizeOnSave(str(tmp_path / "store"))], steps=1000)  # fails in setup, before training
    r = run("a", [QuantizeOnSave(str(tmp_path / "store"), overwrite_task=True)], steps=4, lr=1e-2)
    store = TaskVectorStore(tmp_path / "store")
    assert store.tasks == ["a", "b"]
    assert_stored(store, "a", r.tau())
    files = sorted(p.name for p in (tmp_path / "store" / "tasks").iterdir())
    assert len(files) == 2 and not any("replacing" in f for f in files)
    assert store.layout.tasks["a"].source == "<a state dict>"


def test_on_checkpoint_replaces_each_save(tmp_path, run):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    r = run("a", [QuantizeOnSave(str(tmp_path / "store"), on="checkpoint"), ckpt], steps=7, enable_checkpointing=True)
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert len(saved) >= 2  # steps 3 and 6
    last = torch.load(tmp_path / "ckpt" / "epoch=0-step=6.ckpt", weights_only=False)["state_dict"]
    tau = {k[len("encoder."):]: v - r.start[k[len("encoder."):]] for k, v in last.items() if k.startswith("encoder.")}
    store = TaskVectorStore(tmp_path / "store")
    assert store.tasks == ["a"]
    assert_stored(store, "a", tau)


def test_replace_inside_a_shared_store_on_checkpoint(tmp_path, run):
    run("b", [QuantizeOnSave(str(tmp_path / "store"))])
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    r = run("a", [QuantizeOnSave(str(tmp_path / "store"), on="both"), ckpt], steps=5, enable_checkpointing=True)
    store = TaskVectorStore(tmp_path / "store")
    assert store.tasks == ["b", "a"]
    assert_stored(store, "a", r.tau())  # the end-of-training save replaced the checkpoint ones
    layout = json.loads((tmp_path / "store" / "layout.json").read_text())
    on_disk = {f"tasks/{p.name}" for p in (tmp_path / "store" / "tasks").iterdir()}
    assert on_disk == {t["file"] for t in layout["tasks"].values()}


def test_pretrained_file_and_settings(tmp_path, run):
    enc = run.make_encoder()
    save_safetensors({f"model.encoder.{k}": v for k, v in enc.state_dict().items()}, tmp_path / "full.safetensors")
    cb = QuantizeOnSave(str(tmp_path / "store"), task="mytask", pretrained=str(tmp_path / "full.safetensors"),
                        pretrained_prefix="model.encoder.", bits=3)
    r = run("a", [cb], encoder=enc)
    store = TaskVectorStore(tmp_path / "store")
    assert store.tasks == ["mytask"] and store.config.bits == 3
    assert_stored(store, "mytask", r.tau(), bits=3)
    with pytest.raises(TvqError, match="holds TVQ-INT3 task vectors .* set to TVQ-INT4"):
        run("b", [QuantizeOnSave(str(tmp_path / "store"))])


def test_rtvq_store_from_runs(tmp_path, run):
    ra = run("a", [QuantizeOnSave(str(tmp_path / "store"), scheme="rtvq")])
    rb = run("b", [QuantizeOnSave(str(tmp_path / "store"), scheme="rtvq")])
    store = TaskVectorStore(tmp_path / "store")
    assert store.tasks == ["a", "b"] and store.scheme == "rtvq"
    for r, t in ((ra, "a"), (rb, "b")):
        for k, v in r.tau().items():
            err = (store.task_vector(t, k) - v).abs().max()
            assert err <= (v.max() - v.min()) / 2 + 1e-6, k  # B3O2 with error correction: bounded by the offset step


def test_errors(tmp_path):
    with pytest.raises(TvqError, match="on='sometimes'"):
        QuantizeOnSave(str(tmp_path / "s"), on="sometimes")
    with pytest.raises(Exception, match="bits"):
        QuantizeOnSave(str(tmp_path / "s"), bits=12)
    m = pl.LightningModule()
    with pytest.raises(TvqError, match="needs a task name"):
        QuantizeOnSave(str(tmp_path / "s")).setup(pl.Trainer(**{"logger": False}), m, "fit")


def test_resumed_run_keeps_the_starting_weights(tmp_path, run):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3)
    first = run("a", [QuantizeOnSave(str(tmp_path / "store"), on="both"), ckpt], steps=3, enable_checkpointing=True)
    # a fresh process would rebuild the module from its config: theta_0 again, then restore step 3
    from tvq_lightning.modules.finetune import FineTuneModule

    enc = run.make_encoder()
    module = FineTuneModule(enc, "a", lr=3e-3, warmup_steps=2, probe_steps=50)
    trainer = pl.Trainer(max_steps=6, num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=True,
                         callbacks=[QuantizeOnSave(str(tmp_path / "store"), on="both"),
                                    ModelCheckpoint(dirpath=tmp_path / "ckpt2", every_n_train_steps=3)],
                         **{k: v for k, v in run.QUIET.items() if k != "enable_checkpointing"})
    trainer.fit(module, run.toy("a"), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt"))
    assert torch.equal(module.head.weight, first.module.head.weight)  # restored, not re-fitted
    tau = {k: v - first.start[k] for k, v in enc.state_dict().items()}
    assert any(not torch.equal(v, first.encoder.state_dict()[k]) for k, v in enc.state_dict().items())
    assert_stored(TaskVectorStore(tmp_path / "store"), "a", tau)  # final - theta_0, not final - step 3


def _rel_error(store: TaskVectorStore, task: str, tau: dict) -> float:
    from tvq_lightning.quant.schemes import relative_l2_error

    keys = [k for k in store.keys if store.layout.keys[k].quantized]
    return relative_l2_error(torch.cat([store.task_vector(task, k).reshape(-1) for k in keys]),
                             torch.cat([tau[k].reshape(-1) for k in keys]))


def test_rtvq_one_run_per_task_recomputes_the_one_task_base(tmp_path, run):
    ra = run("a", [QuantizeOnSave(str(tmp_path / "store"), scheme="rtvq")])
    rb = run("b", [QuantizeOnSave(str(tmp_path / "store"), scheme="rtvq")])
    store = TaskVectorStore(tmp_path / "store")
    assert store.layout.base_tasks == ("a", "b")  # the second run recomputed the base over both tasks
    for r, t in ((ra, "a"), (rb, "b")):  # a frozen one-task base gave task b an error of ~1
        assert _rel_error(store, t, r.tau()) < 0.6, t


def test_bitdelta_store_from_runs(tmp_path, run):
    from tvq_lightning.quant.schemes import bitdelta_dequantize, bitdelta_quantize

    ra = run("a", [QuantizeOnSave(str(tmp_path / "store"), scheme="bitdelta")])
    store = TaskVectorStore(tmp_path / "store")
    assert store.config.label == "BitDelta" and store.scheme == "bitdelta"
    for k, v in ra.tau().items():
        want = bitdelta_dequantize(*bitdelta_quantize(v), v.shape) if store.layout.keys[k].quantized else v
        assert torch.equal(store.task_vector("a", k), want), k
    with pytest.raises(TvqError, match="unknown: choose one of"):
        QuantizeOnSave(str(tmp_path / "s"), scheme="int3")
