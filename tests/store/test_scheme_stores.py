"""Stores of the BitDelta scheme and of a toy scheme registered from the tests, end to end; the
RTVQ fixes (a base built from one task; the label without error correction)."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from _scheme_roundtrip import roundtrip, tiny_weights

from tvq_lightning.errors import QuantConfigError, StoreError
from tvq_lightning.quant.packing import packed_nbytes
from tvq_lightning.quant.schemes import Scheme, bitdelta_dequantize, bitdelta_quantize, relative_l2_error, registered_scheme
from tvq_lightning.store import StoreConfig, TaskVectorStore, quantize_to_store
from tvq_lightning.store.summary import summarize


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_bitdelta_store_end_to_end(tmp_path, granularity):
    pre, fts = tiny_weights()
    cfg = StoreConfig("bitdelta", granularity=granularity)
    store = roundtrip(cfg, tmp_path, pre, fts)
    lay = store.layout
    for t, ft in fts.items():
        f = store._task_file(t)
        for k, info in lay.keys.items():
            tau = ft[k].float() - pre[k].float()
            got = store.task_vector(t, k, pre[k])
            if not info.quantized:
                assert torch.equal(got, tau) and info.bits is None
            elif not tau.any():
                assert k + "#q" not in f and not got.any()           # a zero task vector stores nothing
            else:
                assert info.bits == 1
                assert torch.equal(got, bitdelta_dequantize(*bitdelta_quantize(tau, granularity), info.shape))
                blocks = info.shape[0] if granularity == "channel" else 1
                assert f[k + "#q"].numel() == packed_nbytes(info.numel, 1) == (info.numel + 7) // 8
                assert f[k + "#s"].numel() == blocks and set(f.keys()) & {k + "#z"} == set()
        # bytes accounted: the file is its header plus exactly these tensors
        data = sum(f[n].numel() * f[n].element_size() for n in f.keys())
        size = (store.path / lay.tasks[t].file).stat().st_size
        header = int.from_bytes((store.path / lay.tasks[t].file).read_bytes()[:8], "little")
        assert size == 8 + header + data
    s = summarize(store)
    assert s["bits_per_param"] == 1.0 and s["bits_histogram"] == {"1": s["quantized_params"]}


def test_bitdelta_budget_allocates_one_bit(tmp_path):
    pre, fts = tiny_weights()
    quantize_to_store(pre, fts, tmp_path / "s", StoreConfig("bitdelta", budget=1.5, per_tensor_bits=True), progress=False)
    store = TaskVectorStore(tmp_path / "s")
    assert set(store.layout.allocation["bits"].values()) == {1}
    from tvq_lightning.errors import BudgetError

    with pytest.raises(BudgetError, match="below the minimum 1"):
        quantize_to_store(pre, fts, tmp_path / "b", StoreConfig("bitdelta", budget=0.5), progress=False)


class Half(Scheme):
    """A toy scheme defined only in the tests: tau stored as float16 for quantized keys."""

    name = "toy_fp16"
    key_fields = ("bits",)

    def key_widths(self, cfg, key, allocation=None):
        return {"bits": 16}

    def widths(self, cfg):
        return ()

    def fixed_label(self, cfg):
        return "TOY-FP16"

    def stored_parts(self, cfg, info):
        return {"#h": ("F16", len(info.shape))}, 2 * info.numel

    def encode_quantized(self, tau, lo, hi, info, cfg, key, *, finetuned=None, shared=None):
        return {key + "#h": tau.half()}

    def decode_quantized(self, cfg, info, parts, shared):
        return parts["#h"].float() if "#h" in parts else None


def test_a_scheme_registered_from_the_tests_works_everywhere(tmp_path):
    pre, fts = tiny_weights()
    with registered_scheme(Half):
        store = roundtrip(StoreConfig("toy_fp16"), tmp_path, pre, fts)
        k = "blocks.0.linear1.weight"
        tau = fts["t0"][k].float() - pre[k].float()
        assert torch.equal(store.task_vector("t0", k), tau.half().float())
        assert summarize(store)["bits_per_param"] == 16.0
        store.close()
    with pytest.raises(StoreError, match="'toy_fp16' is unknown.*register that scheme"):
        TaskVectorStore(tmp_path / "store")  # the scheme is gone with its registration


def _errors(store: TaskVectorStore, pre, fts) -> dict[str, float]:
    out = {}
    for t in store.tasks:
        got = torch.cat([store.task_vector(t, k).reshape(-1) for k in store.keys])
        exact = torch.cat([(fts[t][k].float() - pre[k].float()).reshape(-1) for k in store.keys])
        out[t] = relative_l2_error(got, exact)
    return out


def test_rtvq_built_one_task_at_a_time_recomputes_the_base(tmp_path):
    pre, fts = tiny_weights(4)
    cfg = StoreConfig("rtvq")
    quantize_to_store(pre, fts, tmp_path / "joint", cfg, progress=False)
    joint = _errors(TaskVectorStore(tmp_path / "joint"), pre, fts)
    out = tmp_path / "steps"
    for i, t in enumerate(fts):  # one task per call, as QuantizeOnSave does
        if i < 2:
            quantize_to_store(pre, {t: fts[t]}, out, cfg, progress=False)
            continue
        with pytest.warns(UserWarning, match="frozen RTVQ base computed from 2 task"):  # said, not silent
            quantize_to_store(pre, {t: fts[t]}, out, cfg, progress=False)
    store = TaskVectorStore(out)
    assert store.layout.base_tasks == ("t0", "t1")  # recomputed at the second task, frozen after
    steps = _errors(store, pre, fts)
    # a one-task base gave the later tasks ~1.0 (worse than storing nothing); the first two are now
    # as good as a joint build; later tasks against the frozen two-task base stay below 1 (build
    # RTVQ stores from all tasks at once for the best error: recomputing at every step compounds)
    assert max(joint.values()) < 0.7 and steps["t0"] < 0.6 and steps["t1"] < 0.6, (joint, steps)
    assert max(steps.values()) < 0.95, steps


def test_rtvq_frozen_single_task_base_is_refused(tmp_path):
    pre, fts = tiny_weights()
    out = tmp_path / "s"
    quantize_to_store(pre, {"t0": fts["t0"]}, out, StoreConfig("rtvq"), progress=False)
    with pytest.raises(QuantConfigError, match="rtvq_base='recompute' \\(--rtvq-base recompute\\)"):
        quantize_to_store(pre, {"t1": fts["t1"]}, out, StoreConfig("rtvq"), rtvq_base="frozen", progress=False)
    quantize_to_store(pre, {"t1": fts["t1"]}, out, StoreConfig("rtvq"), rtvq_base="recompute", progress=False)
    assert TaskVectorStore(out).layout.base_tasks == ("t0", "t1")


def test_rtvq_label_without_error_correction_is_in_the_files(tmp_path):
    pre, fts = tiny_weights()
    quantize_to_store(pre, fts, tmp_path / "s", StoreConfig("rtvq", error_correction=False), progress=False)
    store = TaskVectorStore(tmp_path / "s")
    assert summarize(store)["scheme"] == "RTVQ-B3O2-noEC"
    with safe_open(str(store.path / store.layout.tasks["t0"].file), "pt") as f:
        assert f.metadata()["scheme"] == "RTVQ-B3O2-noEC"
