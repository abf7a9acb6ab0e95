"""The store of quantized task vectors: exactness per scheme, storage, lazy reads, zero task vectors,
adding tasks (docs/algorithms.md §1-3, §8). Errors, export and atomic writes: test_store_errors.py."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from tvq_lightning.errors import (
    QuantConfigError,
)
from tvq_lightning.quant.qtensor import QTensor
from tvq_lightning.store import LazyStateDict, StoreConfig, TaskVectorStore, quantize_to_store
from tvq_lightning.store.checkpoints import open_checkpoint, read_safetensors_header
from tvq_lightning.store.summary import bits_per_param, summarize

from _store_helpers import CONFIGS, assert_no_error_residue, build, full_precision_keys, quantized_keys, reference  # noqa: E402


# --------------------------------------------------------------------------- exactness per scheme


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_scheme_reads_back_exactly(tmp_path, weights, name):
    cfg = CONFIGS[name]
    store = build(weights, tmp_path / "s", cfg)
    lay = store.layout
    assert store.tasks == weights.names
    assert set(lay.keys) == {k for k, v in weights.pre.items() if v.is_floating_point()}
    for k in weights.pre:
        expect_q = cfg.scheme != "fp32" and weights.pre[k].dim() >= 2
        assert lay.keys[k].quantized == expect_q, k
    for k in weights.pre:
        ref = reference(weights, cfg, k)
        got = store.task_vectors(k, pretrained=weights.pre[k])
        for i, name_ in enumerate(weights.names):
            assert got[i].dtype == torch.float32 and tuple(got[i].shape) == tuple(weights.pre[k].shape)
            assert torch.isfinite(got[i]).all()
            assert torch.equal(got[i], ref[i]), f"{name}: key {k} task {name_}"
            assert torch.equal(store.task_vector(name_, k, weights.pre[k]), ref[i])
        if not lay.keys[k].quantized:  # biases, norms, class token: exact in every scheme
            for i in range(len(weights.fts)):
                assert torch.equal(got[i], weights.tau(i, k))
    store.close()


def test_fp32_is_exact_float32_difference(tmp_path, weights):
    store = build(weights, tmp_path / "s", CONFIGS["fp32"])
    for i, t in enumerate(weights.names):
        for k in weights.pre:
            assert torch.equal(store.task_vector(t, k), weights.fts[i][k].float() - weights.pre[k].float())


@pytest.mark.parametrize("name", ["rtvq_b3o2", "rtvq_group", "rtvq_channel_sym"])
def test_rtvq_error_correction_leaves_only_offset_error(tmp_path, weights, name):
    cfg = CONFIGS[name]
    store = build(weights, tmp_path / "s", cfg)
    for k in quantized_keys(weights.pre):
        taus = [weights.tau(i, k) for i in range(3)]
        base_hat = QTensor.quantize(torch.stack(taus).mean(0), cfg.spec(cfg.base_bits)).dequantize()
        assert torch.equal(store.base_qtensor(k).dequantize(), base_hat)
        for i, t in enumerate(weights.names):
            delta = taus[i] - base_hat
            delta_hat = QTensor.quantize(delta, cfg.spec(cfg.offset_bits)).dequantize()
            assert torch.equal(store.qtensor(t, k).dequantize(), delta_hat)
            tau_hat = store.task_vector(t, k)
            # tau - tau_hat == delta - x_hat(delta), up to float32 rounding of the subtractions
            torch.testing.assert_close(taus[i] - tau_hat, delta - delta_hat, rtol=0, atol=1e-9)
            err = (taus[i] - tau_hat).abs().max()
            bound = (delta.max() - delta.min()) / (2 * (2 ** cfg.offset_bits - 1)) if not cfg.symmetric else delta.abs().max()
            assert err <= bound + 1e-7


def test_rtvq_without_error_correction_uses_fp_mean(tmp_path, weights):
    cfg = CONFIGS["rtvq_b3o2_no_ec"]
    store = build(weights, tmp_path / "s", cfg)
    assert store.config.error_correction is False
    for k in quantized_keys(weights.pre):
        taus = [weights.tau(i, k) for i in range(3)]
        beta = torch.stack(taus).mean(0)
        for i, t in enumerate(weights.names):
            assert torch.equal(store.qtensor(t, k).dequantize(),
                               QTensor.quantize(taus[i] - beta, cfg.spec(cfg.offset_bits)).dequantize())


def test_integer_buffers_are_not_task_vectors(tmp_path, weights):
    for sd in [weights.pre, *weights.fts]:
        sd["bn.num_batches_tracked"] = torch.tensor(17, dtype=torch.int64)
        sd["bn.running_mean"] = weights.pre["ln_pre.bias"].clone()
    store = build(weights, tmp_path / "s", CONFIGS["tvq4"])
    assert "bn.num_batches_tracked" not in store.layout.keys
    assert "bn.running_mean" in store.layout.keys
    with open_checkpoint(tmp_path / "s" / store.layout.tasks["t0"].file) as f:
        assert not any(n.startswith("bn.num_batches_tracked") for n in f)


# --------------------------------------------------------------------------- storage


def _packed_len(numel: int, bits: int, cfg: StoreConfig) -> int:
    n = math.ceil(numel / cfg.group_size) * cfg.group_size if cfg.granularity == "group" else numel
    return math.ceil(n * bits / 8)


def _blocks(shape, cfg: StoreConfig) -> int:
    numel = math.prod(shape)
    return {"tensor": 1, "channel": shape[0], "group": math.ceil(numel / cfg.group_size)}[cfg.granularity]


@pytest.mark.parametrize("name", ["tvq8", "tvq4", "tvq3", "tvq2", "tvq1", "tvq4_group", "tvq3_channel", "fq4",
                                  "rtvq_b3o2", "rtvq_group", "fp32"])
def test_packed_bytes_and_store_size(tmp_path, weights, name):
    cfg = CONFIGS[name]
    store = build(weights, tmp_path / "s", cfg)
    lay = store.layout
    data_bytes = 0
    header_bytes = 0
    paths = [tmp_path / "s" / t.file for t in lay.tasks.values()] + ([tmp_path / "s" / lay.base.file] if lay.base else [])
    for path in paths:
        is_base = lay.base is not None and path.name == Path(lay.base.file).name
        f = open_checkpoint(path)
        entries, _, start = read_safetensors_header(path)
        header_bytes += start
        for k, info in lay.keys.items():
            if info.quantized:
                bits = (info.base_bits if is_base else info.offset_bits) if cfg.scheme == "rtvq" else info.bits
                shape_q, dtype_q = f.meta(k + "#q")
                assert dtype_q == torch.uint8
                assert shape_q == (_packed_len(info.numel, bits, cfg),), (k, bits)
                assert f.meta(k + "#z")[0] == (_blocks(info.shape, cfg),)
                assert f.meta(k + "#s") == ((_blocks(info.shape, cfg),), torch.float32)
                assert k not in f
                data_bytes += shape_q[0] + 8 * _blocks(info.shape, cfg)
            elif not is_base:
                assert f.meta(k) == (info.shape, torch.float32)
                data_bytes += 4 * info.numel
            else:
                assert k not in f
        assert path.stat().st_size == start + sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values())
        # the reserved header stays small next to the data (a few hundred bytes per tensor)
        assert start < 8 + 400 * (len(entries) + 1)
        f.close()
    layout_bytes = (tmp_path / "s" / "layout.json").stat().st_size
    assert store.nbytes() == data_bytes + header_bytes + layout_bytes
    # payload = theory: bits/8 per quantized param (+ one fp32 scale and int32 zero-point per block)
    T = len(lay.tasks)
    theory = 0
    for info in lay.keys.values():
        if not info.quantized:
            theory += T * 4 * info.numel
        elif cfg.scheme == "rtvq":
            blocks = _blocks(info.shape, cfg)
            theory += _packed_len(info.numel, info.base_bits, cfg) + T * _packed_len(info.numel, info.offset_bits, cfg)
            theory += (T + 1) * 8 * blocks
        else:
            theory += T * (_packed_len(info.numel, info.bits, cfg) + 8 * _blocks(info.shape, cfg))
    assert data_bytes == theory

    s = summarize(store)
    fp32_bytes = 4 * sum(v.numel() for v in weights.pre.values() if v.is_floating_point())
    assert s["fp32_checkpoint_bytes"] == fp32_bytes
    assert s["bytes_on_disk"] == store.nbytes()
    assert s["ratio_to_fp32"] == pytest.approx(store.nbytes() / (T * fp32_bytes))
    assert s["num_tasks"] == T and s["tasks"] == weights.names
    expect_bpp = {"fp32": 32.0, "rtvq": cfg.offset_bits + cfg.base_bits / T}.get(cfg.scheme, float(cfg.bits))
    assert s["bits_per_param"] == pytest.approx(expect_bpp)
    assert bits_per_param(store) == pytest.approx(expect_bpp)
    q = sum(v.numel() for k, v in weights.pre.items() if lay.keys[k].quantized)
    fp = sum(v.numel() for k, v in weights.pre.items() if not lay.keys[k].quantized)
    assert s["quantized_params"] == q and s["full_precision_params"] == fp
    assert s["theoretical_ratio"] == pytest.approx((expect_bpp * q + 32 * fp) / (32 * (q + fp)))
    # bytes on disk = the theoretical bit count + scales / zero-points + byte rounding + headers + layout.json
    blocks = sum(_blocks(i.shape, cfg) for i in lay.keys.values() if i.quantized) * (T + (cfg.scheme == "rtvq"))
    rounding = sum(1 for i in lay.keys.values() if i.quantized) * (T + 1)
    pad = sum(8 * (math.ceil(i.numel / cfg.group_size) * cfg.group_size - i.numel) / 8
              for i in lay.keys.values() if i.quantized) * (T + 1) if cfg.granularity == "group" else 0
    payload_ratio = data_bytes / (T * fp32_bytes)
    assert s["theoretical_ratio"] <= payload_ratio + 1e-12
    assert payload_ratio <= s["theoretical_ratio"] + (8 * blocks + rounding + pad) / (T * fp32_bytes)
    assert s["ratio_to_fp32"] == pytest.approx(payload_ratio + (header_bytes + layout_bytes) / (T * fp32_bytes))


def test_storage_ratios_ordered_by_bits(tmp_path, weights):
    ratios = {}
    for name in ["fp32", "tvq8", "tvq4", "tvq3", "tvq2", "rtvq_b3o2"]:
        with build(weights, tmp_path / name, CONFIGS[name]) as st:
            ratios[name] = summarize(st)["ratio_to_fp32"]
    assert ratios["fp32"] > ratios["tvq8"] > ratios["tvq4"] > ratios["tvq3"] > ratios["tvq2"]
    assert ratios["tvq4"] > ratios["rtvq_b3o2"] > ratios["tvq2"]  # 2 + 3/T bits: 3 at T = 3, plus a base file
    assert ratios["fp32"] == pytest.approx(1.0, abs=0.05)


# --------------------------------------------------------------------------- lazy reads


@pytest.mark.parametrize("name", ["tvq4", "rtvq_b3o2", "fq4", "fp32"])
def test_single_key_read_touches_only_that_key(tmp_path, weights, name, monkeypatch):
    cfg = CONFIGS[name]
    build(weights, tmp_path / "s", cfg).close()
    seen: list[tuple[str, str]] = []
    orig = LazyStateDict.__getitem__

    def spy(self, key):
        seen.append((self.path.name, key))
        return orig(self, key)

    monkeypatch.setattr(LazyStateDict, "__getitem__", spy)
    store = TaskVectorStore(tmp_path / "s")
    task_file = Path(store.layout.tasks["t1"].file).name
    key = "blocks.0.linear1.weight"
    tau = store.task_vector("t1", key, weights.pre[key])
    assert torch.equal(tau, reference(weights, cfg, key)[1])
    if cfg.scheme == "fp32":
        expected = {(task_file, key)}
    else:
        expected = {(task_file, key + s) for s in ("#q", "#z", "#s")}
    if cfg.scheme == "rtvq":
        base_file = Path(store.layout.base.file).name
        expected |= {(base_file, key + s) for s in ("#q", "#z", "#s")}
    assert set(seen) == expected
    assert len(seen) == len(expected)

    seen.clear()
    bias = "blocks.0.linear1.bias"
    assert torch.equal(store.task_vector("t2", bias), weights.tau(2, bias))
    assert seen == [(Path(store.layout.tasks["t2"].file).name, bias)]


# --------------------------------------------------------------------------- zero task vectors


ZERO_SCHEMES = ["fp32", "tvq4", "tvq2", "tvq4_group", "tvq3_channel", "tvq4_symmetric", "rtvq_b3o2",
                "rtvq_b3o2_no_ec", "rtvq_group", "rtvq_channel_sym"]


@pytest.mark.parametrize("name", ZERO_SCHEMES)
def test_unchanged_keys_are_not_stored_and_read_as_zeros(tmp_path, weights, name):
    """Top-only fine-tuning: everything but the projection and final norm is left untouched."""
    cfg = CONFIGS[name]
    changed = {"proj", "ln_post.weight", "ln_post.bias", "blocks.0.linear2.weight"}
    for f in weights.fts:
        for k in f:
            if k not in changed:
                f[k] = weights.pre[k].clone()
    store = build(weights, tmp_path / "s", cfg)
    lay = store.layout
    files = [tmp_path / "s" / t.file for t in lay.tasks.values()] + ([tmp_path / "s" / lay.base.file] if lay.base else [])
    for p in files:
        with open_checkpoint(p) as f:
            stored = {n.split("#")[0] for n in f}
        assert stored <= changed, p.name
    for k in weights.pre:
        for i, t in enumerate(weights.names):
            tau = store.task_vector(t, k)
            assert not torch.isnan(tau).any()
            if k not in changed:
                assert torch.equal(tau, torch.zeros_like(weights.pre[k])), k
            else:
                assert torch.equal(tau, reference(weights, cfg, k)[i]), k
    assert "conv1.weight" in lay.keys and lay.keys["conv1.weight"].quantized == (cfg.scheme != "fp32")


@pytest.mark.parametrize("name", ["tvq3_channel", "rtvq_channel_sym", "tvq4_group"])
def test_zero_blocks_are_exact(tmp_path, weights, name):
    """Per-channel / group-wise: output channels no task changed read back as exact zeros."""
    cfg = CONFIGS[name]
    k = "conv1.weight"
    for f in weights.fts:
        f[k][4:] = weights.pre[k][4:]
    store = build(weights, tmp_path / "s", cfg)
    for i, t in enumerate(weights.names):
        tau = store.task_vector(t, k)
        assert torch.isfinite(tau).all()
        assert torch.equal(tau[4:], torch.zeros_like(tau[4:]))
        assert torch.equal(tau, reference(weights, cfg, k)[i])


def test_key_zero_in_one_task_only(tmp_path, weights):
    k = "blocks.0.self_attn.in_proj_weight"
    weights.fts[1][k] = weights.pre[k].clone()
    store = build(weights, tmp_path / "s", CONFIGS["tvq4"])
    with open_checkpoint(tmp_path / "s" / store.layout.tasks["t1"].file) as f:
        assert k + "#q" not in f
    with open_checkpoint(tmp_path / "s" / store.layout.tasks["t0"].file) as f:
        assert k + "#q" in f
    assert store.qtensor("t1", k) is None
    assert torch.equal(store.task_vector("t1", k), torch.zeros(weights.pre[k].shape))
    assert torch.equal(store.task_vector("t0", k), reference(weights, CONFIGS["tvq4"], k)[0])


# --------------------------------------------------------------------------- adding tasks


def _file_state(root: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", ["tvq4", "fq4", "fp32", "tvq3_channel"])
def test_add_task_leaves_old_files_untouched(tmp_path, weights, name):
    cfg = CONFIGS[name]
    out = tmp_path / "s"
    build(weights, out, cfg, tasks=[0, 1]).close()
    before = _file_state(out)
    quantize_to_store(weights.pre, {"t2": weights.fts[2]}, out, cfg, progress=False)
    after = _file_state(out)
    for rel, state in before.items():
        if rel != "layout.json":
            assert after[rel] == state, rel
    store = TaskVectorStore(out)
    assert store.tasks == ["t0", "t1", "t2"]
    assert len(after) == len(before) + 1
    for k in weights.pre:
        ref = reference(weights, cfg, k)
        for i, t in enumerate(store.tasks):
            assert torch.equal(store.task_vector(t, k, weights.pre[k]), ref[i]), (t, k)


def test_add_task_with_default_config_uses_store_settings(tmp_path, weights):
    out = tmp_path / "s"
    build(weights, out, CONFIGS["tvq3"], tasks=[0]).close()
    lay = quantize_to_store(weights.pre, {"t1": weights.fts[1]}, out, progress=False)
    assert lay.config == CONFIGS["tvq3"]
    store = TaskVectorStore(out)
    k = "conv1.weight"
    assert torch.equal(store.task_vector("t1", k), reference(weights, CONFIGS["tvq3"], k)[1])


def test_add_task_with_other_config_is_refused(tmp_path, weights, snap):
    out = tmp_path / "s"
    build(weights, out, CONFIGS["tvq4"], tasks=[0]).close()
    before = snap(tmp_path)
    with pytest.raises(QuantConfigError, match=re.escape(str(out))):
        quantize_to_store(weights.pre, {"t1": weights.fts[1]}, out, CONFIGS["tvq2"], progress=False)
    assert_no_error_residue(before, snap(tmp_path))


def test_rtvq_add_task_frozen_base(tmp_path, weights):
    cfg = CONFIGS["rtvq_b3o2"]
    out = tmp_path / "s"
    store = build(weights, out, cfg, tasks=[0, 1])
    old = {(t, k): store.task_vector(t, k) for t in ("t0", "t1") for k in weights.pre}
    store.close()
    before = _file_state(out)
    lay = quantize_to_store(weights.pre, {"t2": weights.fts[2]}, out, cfg, rtvq_base="frozen", progress=False)
    assert lay.generation == 1 and lay.base_tasks == ("t0", "t1")
    after = _file_state(out)
    for rel, state in before.items():
        if rel != "layout.json":
            assert after[rel] == state, rel
    store = TaskVectorStore(out)
    for (t, k), v in old.items():
        assert torch.equal(store.task_vector(t, k), v)
    for k in weights.pre:
        tau = weights.tau(2, k)
        got = store.task_vector("t2", k)
        if not store.layout.keys[k].quantized:
            assert torch.equal(got, tau)
            continue
        base_hat = store.base_qtensor(k).dequantize()
        delta = tau - base_hat
        delta_hat = QTensor.quantize(delta, cfg.spec(cfg.offset_bits)).dequantize()
        assert torch.equal(got, delta_hat + base_hat)
        torch.testing.assert_close(tau - got, delta - delta_hat, rtol=0, atol=1e-9)


def test_rtvq_frozen_base_with_keys_absent_from_base(tmp_path, weights):
    """Old tasks left conv1 unchanged (no base for it): a new task's conv1 is its own offset."""
    cfg = CONFIGS["rtvq_b3o2"]
    k = "conv1.weight"
    for f in weights.fts[:2]:
        f[k] = weights.pre[k].clone()
    out = tmp_path / "s"
    build(weights, out, cfg, tasks=[0, 1]).close()
    assert TaskVectorStore(out).base_qtensor(k) is None
    zero_ft = dict(weights.fts[2], **{k: weights.pre[k].clone()})
    quantize_to_store(weights.pre, {"t2": weights.fts[2], "t3": zero_ft}, out, cfg, progress=False)
    store = TaskVectorStore(out)
    assert store.base_qtensor(k) is None
    assert torch.equal(store.task_vector("t2", k), QTensor.quantize(weights.tau(2, k), cfg.spec(cfg.offset_bits)).dequantize())
    for t in ("t0", "t1", "t3"):
        assert torch.equal(store.task_vector(t, k), torch.zeros(weights.pre[k].shape))
    with open_checkpoint(out / store.layout.tasks["t3"].file) as f:
        assert k + "#q" not in f


def test_rtvq_add_task_recompute_base(tmp_path, weights):
    cfg = CONFIGS["rtvq_b3o2"]
    out = tmp_path / "s"
    store = build(weights, out, cfg, tasks=[0, 1])
    old_lay = store.layout
    old_hat = {(t, k): store.task_vector(t, k) for t in ("t0", "t1") for k in weights.pre}
    old_base = {k: store.base_qtensor(k).dequantize() for k in quantized_keys(weights.pre)}
    store.close()
    lay = quantize_to_store(weights.pre, {"t2": weights.fts[2]}, out, cfg, rtvq_base="recompute", progress=False)
    assert lay.generation == old_lay.generation + 1
    assert lay.base.file != old_lay.base.file and set(lay.base_tasks) == {"t0", "t1", "t2"}
    for rel in [old_lay.base.file, *(t.file for t in old_lay.tasks.values())]:
        assert not (out / rel).exists(), rel
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert on_disk == {"layout.json", lay.base.file, *(t.file for t in lay.tasks.values())}
    store = TaskVectorStore(out)
    assert store.tasks == ["t0", "t1", "t2"]
    changed = False
    for k in quantized_keys(weights.pre):
        p = weights.pre[k].float()
        # old tasks enter the new base through their stored reconstruction theta_0 + tau_hat
        taus = [(old_hat[("t0", k)] + p) - p, (old_hat[("t1", k)] + p) - p, weights.tau(2, k)]
        base_hat = QTensor.quantize(torch.stack(taus).mean(0), cfg.spec(cfg.base_bits)).dequantize()
        assert torch.equal(store.base_qtensor(k).dequantize(), base_hat)
        changed |= not torch.equal(base_hat, old_base[k])
        for i, t in enumerate(store.tasks):
            got = store.task_vector(t, k)
            assert torch.isfinite(got).all()
            assert torch.equal(got, QTensor.quantize(taus[i] - base_hat, cfg.spec(cfg.offset_bits)).dequantize() + base_hat)
    assert changed
    for k in full_precision_keys(weights.pre):
        for i, t in enumerate(store.tasks):
            torch.testing.assert_close(store.task_vector(t, k), weights.tau(i, k), rtol=0, atol=1e-6)
