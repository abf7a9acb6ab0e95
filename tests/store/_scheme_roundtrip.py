"""One scheme through everything a store is used for: quantize -> inspect -> merge (every
registered method) -> packed adaptation buffers -> a gradient step on merge coefficients -> export.
Shared by the BitDelta tests and the toy-scheme test (a scheme registered from the tests only)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from tvq_lightning.adapt.merge_fn import merged_params
from tvq_lightning.adapt.packed import PackedTaskVectors
from tvq_lightning.merging import iter_merged, list_mergers, merge_state_dict, plan_merge
from tvq_lightning.store import StoreConfig, TaskVectorStore, quantize_to_store
from tvq_lightning.store.export import export_task
from tvq_lightning.store.summary import format_summary, summarize
from tvq_lightning.testing import synthetic_finetunes, tiny_pretrained


def tiny_weights(num_tasks: int = 3):
    """theta_0 of a tiny encoder and fine-tunes, one with a zero full-precision and a zero quantized key."""
    pre = {k: v.detach().clone().contiguous() for k, v in tiny_pretrained(0, width=32, depth=1).state_dict().items()}
    fts = dict(zip([f"t{i}" for i in range(num_tasks)], synthetic_finetunes(pre, num_tasks, seed=4)))
    fts["t1"]["ln_pre.bias"] = pre["ln_pre.bias"].clone()
    fts["t2"]["proj"] = pre["proj"].clone()
    return pre, fts


def roundtrip(cfg: StoreConfig, root: Path, pre, fts) -> TaskVectorStore:
    """Run the whole tour; returns the store (asserting along the way)."""
    out = root / "store"
    quantize_to_store(pre, fts, out, cfg, progress=False)
    store = TaskVectorStore(out)
    assert store.config == cfg and store.tasks == list(fts)
    s = summarize(store)
    assert s["scheme"] == cfg.label and s["bytes_on_disk"] == store.nbytes()
    assert cfg.label in format_summary(s)
    decoded = {t: store.task_state_dict(t, pre) for t in store.tasks}
    assert not decoded["t1"]["ln_pre.bias"].any() and not decoded["t2"]["proj"].any()
    for name in list_mergers():  # every registered merging method runs on the store
        plan = plan_merge(store, pre, name)
        if plan.merger.per_task:
            merged = [v for _, v, _ in iter_merged(plan)]
            assert len(merged) == len(pre)
        else:
            merged = merge_state_dict(store, pre, name)
            assert set(merged) == set(pre) and all(torch.isfinite(v).all() for v in merged.values() if v.is_floating_point())
    ta = merge_state_dict(store, pre, "task_arithmetic", scaling=1.0)
    for k in store.keys:
        torch.testing.assert_close(ta[k].float(), pre[k].float() + sum(decoded[t][k] for t in store.tasks))
    packed = PackedTaskVectors(store, pre)  # adaptation on the packed codes: same decode as the store
    for k in store.keys:
        for i, t in enumerate(store.tasks):
            assert torch.equal(packed.dequantize(k, i), decoded[t][k]), (k, t)
    coeffs = torch.full((len(store.tasks),), 0.3, requires_grad=True)
    params = merged_params(packed, {k: v.float() for k, v in pre.items()}, coeffs)
    sum(p.square().sum() for p in params.values()).backward()
    assert coeffs.grad is not None and torch.isfinite(coeffs.grad).all() and coeffs.grad.abs().sum() > 0
    dest = root / "t0.safetensors"
    export_task(out, "t0", dest, pretrained=pre)
    exported = load_file(str(dest))
    for k in store.keys:
        assert torch.equal(exported[k].float(), decoded["t0"][k])
    return store
