"""BitAllocation: gradient sensitivities at the start, a per-key allocation at the end, in the store."""
import math

import lightning.pytorch as pl
import pytest
import torch

from tvq_lightning.callbacks import BitAllocation, QuantizeOnSave
from tvq_lightning.errors import QuantConfigError, TvqError
from tvq_lightning.quant.allocation import Allocation, allocate_from_taus
from tvq_lightning.quant.config import QuantSpec
from tvq_lightning.quant.qtensor import QTensor
from tvq_lightning.store import StoreConfig, TaskVectorStore, quantize_to_store


def allocated_run(run, store, budget=3.0, **kw):
    alloc = BitAllocation(budget=budget, num_batches=3, **kw)
    r = run("a", [QuantizeOnSave(str(store)), alloc])
    return r, alloc


def bits_per_param(store: TaskVectorStore) -> float:
    q = [i for i in store.layout.keys.values() if i.quantized]
    return sum(i.numel * i.bits for i in q) / sum(i.numel for i in q)


def test_allocation_within_budget_recorded_and_used(tmp_path, run):
    r, alloc = allocated_run(run, tmp_path / "store")
    store = TaskVectorStore(tmp_path / "store")
    rec = store.layout.allocation
    quantized = [k for k, i in store.layout.keys.items() if i.quantized]
    assert set(rec["bits"]) == set(quantized) and rec["per_tensor"] and rec["budget"] == 3.0
    assert bits_per_param(store) <= 3.0 + 1e-9 and rec["bits_per_param"] == pytest.approx(bits_per_param(store))
    assert rec["description"] == alloc.allocation.describe() and rec["description"].startswith("tvq per-tensor")
    assert set(rec["sensitivity"]) == set(quantized) and all(w > 0 for w in rec["sensitivity"].values())
    assert set(alloc.sensitivities) == {n for n, _ in r.encoder.named_parameters()}
    assert r.module._tvq_allocation is alloc.allocation
    assert store.config.budget == 3.0 and store.config.per_tensor_bits
    for k, t in r.tau().items():  # every key stored at its allocated width
        want = QTensor.quantize(t, QuantSpec(rec["bits"][k])).dequantize() if k in rec["bits"] else t
        assert torch.equal(store.task_vector("a", k), want), k
    assert len(set(rec["bits"].values())) > 1  # the widths differ per tensor


def test_same_seed_same_allocation(tmp_path, run):
    _, a1 = allocated_run(run, tmp_path / "s1")
    _, a2 = allocated_run(run, tmp_path / "s2")
    assert a1.sensitivities == a2.sensitivities
    assert TaskVectorStore(tmp_path / "s1").layout.allocation == TaskVectorStore(tmp_path / "s2").layout.allocation


def test_callback_follows_the_documented_procedure(tmp_path, run):
    r, alloc = allocated_run(run, tmp_path / "s", budget=2.5)
    weights = {k: alloc.sensitivities[k] for k in alloc.allocation.bits}
    taus = {k: [t] for k, t in r.tau().items() if k in alloc.allocation.bits}
    ref = allocate_from_taus(taus, 2.5, scheme="tvq", per_tensor=True, sensitivity=weights)
    assert ref.bits == alloc.allocation.bits  # the callback is the documented procedure
    uniform = BitAllocation(budget=2.5, sensitivity="uniform")
    pre = r.start
    ft = r.encoder.state_dict()
    u, w = uniform.tvq_allocation(pre, ft, StoreConfig())
    assert w is None and u.bits == allocate_from_taus(taus, 2.5, scheme="tvq", per_tensor=True).bits


def test_rtvq_allocation_prices_the_base(tmp_path, run):
    store = tmp_path / "s"
    r = run("a", [QuantizeOnSave(str(store), scheme="rtvq"), BitAllocation(budget=2.5, num_tasks=4, num_batches=2)])
    rec = TaskVectorStore(store).layout.allocation
    assert rec["scheme"] == "rtvq" and rec["num_tasks"] == 4
    n = {k: i.numel for k, i in TaskVectorStore(store).layout.keys.items() if i.quantized}
    bpp = sum(n[k] * (rec["offset_bits"][k] + rec["base_bits"][k] / 4) for k in n) / sum(n.values())
    assert bpp <= 2.5 + 1e-9 and bpp == pytest.approx(rec["bits_per_param"])
    assert r.module._tvq_allocation.scheme == "rtvq"


def test_second_task_takes_the_store_widths(tmp_path, run):
    allocated_run(run, tmp_path / "s")
    first = TaskVectorStore(tmp_path / "s").layout
    rb = run("b", [QuantizeOnSave(str(tmp_path / "s")), BitAllocation(budget=3.0, num_batches=2)])
    store = TaskVectorStore(tmp_path / "s")
    assert store.tasks == ["a", "b"] and store.layout.keys == first.keys
    assert not hasattr(rb.module, "_tvq_allocation")
    for k, t in rb.tau().items():
        info = store.layout.keys[k]
        want = QTensor.quantize(t, QuantSpec(info.bits)).dequantize() if info.quantized else t
        assert torch.equal(store.task_vector("b", k), want), k


class NoHookModule(pl.LightningModule):
    """A module without sensitivity_loss: the callback falls back to training_step (which logs)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder, self.task = encoder, "plain"
        self.head = torch.nn.Linear(16, 4)

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.cross_entropy(self.head(self.encoder(batch[0])), batch[1])
        self.log("train/loss", loss)
        return {"loss": loss}

    def configure_optimizers(self):
        return torch.optim.SGD(self.encoder.parameters(), lr=0.1)


def test_fallback_to_training_step(tmp_path, run):
    enc, alloc = run.make_encoder(), BitAllocation(budget=3.0, num_batches=2)
    module = NoHookModule(enc)
    pl.seed_everything(0)
    trainer = pl.Trainer(max_steps=2, limit_val_batches=0, callbacks=[QuantizeOnSave(str(tmp_path / "s")), alloc],
                         **run.QUIET)
    trainer.fit(module, run.toy("a"))
    assert set(alloc.sensitivities) == {n for n, _ in enc.named_parameters()}
    assert all(v > 0 for v in alloc.sensitivities.values())
    assert TaskVectorStore(tmp_path / "s").tasks == ["plain"]
    assert "log" not in vars(module)  # logging restored after the estimate


def test_scheme_mismatch_fails_before_training(tmp_path, run):
    with pytest.raises(TvqError, match="BitAllocation scheme=rtvq but QuantizeOnSave scheme=tvq"):
        run("a", [QuantizeOnSave(str(tmp_path / "s")), BitAllocation(budget=3, scheme="rtvq")], steps=1000)
    with pytest.raises(TvqError, match="applies to the tvq, rtvq, bitdelta schemes; QuantizeOnSave uses fp32"):
        run("a", [QuantizeOnSave(str(tmp_path / "s"), scheme="fp32"), BitAllocation(budget=3)], steps=1000)
    with pytest.raises(TvqError, match="sensitivity='fisher'"):
        BitAllocation(budget=3, sensitivity="fisher")
    with pytest.raises(TvqError, match="no sensitivities"):
        BitAllocation(budget=3).tvq_allocation({"w": torch.zeros(2, 2)}, {"w": torch.ones(2, 2)}, StoreConfig())


def test_callback_state_restores_sensitivities():
    a = BitAllocation(budget=3)
    a.sensitivities = {"w": 0.5}
    a.allocation = Allocation("tvq", 3.0, 1, True, 3.0, 1.0, bits={"w": 3})
    b = BitAllocation(budget=3)
    b.load_state_dict(a.state_dict())
    assert b.sensitivities == {"w": 0.5} and b.allocation == a.allocation


def test_writer_allocation_parameter(tmp_path):
    pre = {"w": torch.randn(8, 8), "v": torch.randn(16, 4), "b": torch.randn(8)}
    ft = {k: v + 0.01 * torch.randn_like(v) for k, v in pre.items()}
    alloc = Allocation("tvq", 3.0, 1, True, 3.0, 0.0, bits={"w": 2, "v": 5})
    lay = quantize_to_store(pre, {"t": ft}, tmp_path / "s", allocation=alloc, sensitivity={"w": 1.0, "v": 2.0},
                            progress=False)
    assert lay.keys["w"].bits == 2 and lay.keys["v"].bits == 5 and not lay.keys["b"].quantized
    assert lay.allocation["sensitivity"] == {"w": 1.0, "v": 2.0} and "description" in lay.allocation
    assert Allocation.from_json({k: v for k, v in lay.allocation.items()
                                 if k not in ("description", "sensitivity")}) == alloc
    store = TaskVectorStore(tmp_path / "s")
    assert torch.equal(store.task_vector("t", "w"), QTensor.quantize(ft["w"] - pre["w"], QuantSpec(2)).dequantize())
    with pytest.raises(QuantConfigError, match="exists: added tasks take its recorded per-key widths"):
        quantize_to_store(pre, {"u": ft}, tmp_path / "s", allocation=alloc, progress=False)
    with pytest.raises(QuantConfigError, match="no width for quantized key 'v'"):
        quantize_to_store(pre, {"t": ft}, tmp_path / "s2", allocation=Allocation("tvq", 3.0, 1, True, 3.0, 0.0,
                                                                                      bits={"w": 2}), progress=False)
    with pytest.raises(QuantConfigError, match="allocation is for tvq, the store config is rtvq"):
        quantize_to_store(pre, {"t": ft}, tmp_path / "s3", StoreConfig("rtvq"), allocation=alloc, progress=False)
    assert not math.isnan(lay.allocation["objective"])


def test_bitdelta_allocation_is_one_bit_per_key():
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(8, 8, generator=g), "b": torch.zeros(8)}
    ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
    alloc, weights = BitAllocation(budget=1.5, sensitivity="uniform").tvq_allocation(pre, ft, StoreConfig("bitdelta"))
    assert weights is None and alloc.scheme == "bitdelta" and alloc.bits == {"w": 1}
