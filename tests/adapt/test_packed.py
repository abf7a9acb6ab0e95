"""PackedTaskVectors: exact decoding, packed-only buffers, the torch (CUDA) path, AdaMerging++ election."""
from __future__ import annotations

import pytest
import torch

from tvq_lightning.adapt import PackedTaskVectors, base_tensors, merged_params
from tvq_lightning.errors import FingerprintMismatch, StoreError
from tvq_lightning.merging import merge_state_dict
from tvq_lightning.merging.methods.ties import TiesConfig, ties_rank
from tvq_lightning.quant.packing import packed_nbytes
from tvq_lightning.store import TaskVectorStore
from tvq_lightning.testing import tiny_pretrained

TASKS = ["t0", "t1", "t2"]        # as in conftest.py
ZERO_KEY = "ln_pre.bias"


@pytest.mark.parametrize("scheme", ["fp32", "tvq", "tvq2", "rtvq", "fq", "channel"])
def test_dequantize_equals_store(stores, scheme):
    st = TaskVectorStore(stores.paths[scheme])
    packed = PackedTaskVectors(st, stores.pre)
    assert packed.tasks == TASKS and packed.keys == st.keys
    for key in st.keys:
        ref = st.task_vectors(key, TASKS, stores.pre[key])
        for t in range(len(TASKS)):
            assert torch.equal(packed.dequantize(key, t), ref[t]), (key, t)


def test_readonly_vectors_share_the_buffers_and_default_ones_are_copies(stores):
    packed = PackedTaskVectors(TaskVectorStore(stores.paths["fp32"]), stores.pre)
    key = "blocks.0.linear1.weight"
    fresh = dict(packed.iter_task_vectors(key))
    shared = dict(packed.iter_task_vectors(key, readonly=True))
    assert fresh.keys() == shared.keys() and fresh
    buffers = {b.data_ptr() for b in packed.buffers()}
    for t in fresh:
        assert torch.equal(fresh[t], shared[t])
        assert shared[t].data_ptr() in buffers and fresh[t].data_ptr() not in buffers
        fresh[t].zero_()                                    # the caller may modify a fresh one
    assert all(torch.equal(a, b) for a, b in zip(shared.values(), dict(packed.iter_task_vectors(key)).values()))


def test_zero_task_vectors_hold_nothing(stores):
    st = TaskVectorStore(stores.paths["tvq"])
    packed = PackedTaskVectors(st, stores.pre)
    for key, t in ((ZERO_KEY, 1), ("blocks.0.linear1.weight", 2)):
        i = st.keys.index(key)
        assert not [n for n, _ in packed.named_buffers() if n.startswith(f"k{i}_t{t}_")]
        assert torch.equal(packed.dequantize(key, t), torch.zeros(st.layout.keys[key].shape))
        assert t not in [s for s, _ in packed.iter_task_vectors(key)]


@pytest.mark.parametrize("scheme", ["tvq", "tvq2", "rtvq"])
def test_buffers_are_packed_codes(stores, scheme):
    """(e) memory: quantized keys are held as uint8 codes + one zero-point and scale, never as floats."""
    st = TaskVectorStore(stores.paths[scheme])
    packed = PackedTaskVectors(st, stores.pre)
    bufs = dict(packed.named_buffers())
    expected = 0
    for i, key in enumerate(st.keys):
        info = st.layout.keys[key]
        n = torch.Size(info.shape).numel()
        mine = {name: b for name, b in bufs.items() if name.startswith(f"k{i}_")}
        if not info.quantized:
            expected += sum(4 * n for t in TASKS if not torch.equal(st.task_vector(t, key), torch.zeros(info.shape)))
            continue
        for name, b in mine.items():
            assert not (b.is_floating_point() and b.numel() == n), f"{name}: a float copy of quantized key {key}"
            if name.endswith("_q"):
                assert b.dtype == torch.uint8
        for part in ["base"] * (scheme == "rtvq") + [f"t{t}" for t in range(len(TASKS))]:
            if f"k{i}_{part}_q" in mine:
                bits = info.base_bits if part == "base" else (info.offset_bits if scheme == "rtvq" else info.bits)
                expected += packed_nbytes(n, bits) + 8
    assert packed.nbytes() == expected
    fp32_bytes = 4 * len(TASKS) * sum(torch.Size(st.layout.keys[k].shape).numel() for k in st.keys)
    assert packed.nbytes() < fp32_bytes / 4
    assert packed.state_dict() == {}           # non-persistent: checkpoints never duplicate the store
    assert packed.to("cpu").device.type == "cpu"


@pytest.mark.parametrize("scheme", ["tvq", "rtvq", "channel", "fq"])
def test_torch_path_equals_numba_path(stores, scheme, monkeypatch):
    """The pure-torch decode (the one CUDA runs) gives the numba kernel's values bit for bit."""
    packed = PackedTaskVectors(stores.paths[scheme], stores.pre)
    fast = {(k, t): packed.dequantize(k, t) for k in packed.keys for t in range(len(TASKS))}
    monkeypatch.setenv("TVQ_DISABLE_NUMBA", "1")
    for (k, t), v in fast.items():
        assert torch.equal(packed.dequantize(k, t), v), (k, t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["tvq", "rtvq"])
def test_cuda_decode(stores, scheme):
    packed = PackedTaskVectors(stores.paths[scheme], stores.pre)
    cpu = {(k, t): packed.dequantize(k, t) for k in packed.keys for t in range(len(TASKS))}
    packed.to("cuda")
    for (k, t), v in cpu.items():
        out = packed.dequantize(k, t)
        assert out.device.type == "cuda" and torch.equal(out.cpu(), v)


def _dense_ties_split(taus: dict[str, list[torch.Tensor]], keys: list[str], k: float = 0.2) -> dict[str, list[torch.Tensor]]:
    """The official AdaMerging++ reference on the flattened model: trim, elect, keep agreeing entries."""
    flat = torch.stack([torch.cat([taus[key][t].reshape(-1) for key in keys]) for t in range(len(TASKS))])
    d = flat.shape[1]
    kth = flat.abs().kthvalue(d - ties_rank(d, k) + 1, dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    gamma = torch.sign(trimmed.sum(0))
    gamma[gamma == 0] = torch.sign(gamma.sum())
    selected = trimmed * torch.where(gamma > 0, trimmed > 0, trimmed < 0)
    out, start = {}, 0
    for key in keys:
        n = taus[key][0].numel()
        out[key] = [selected[t, start:start + n].view(taus[key][0].shape) for t in range(len(TASKS))]
        start += n
    return out


@pytest.mark.parametrize("which", ["crafted", "tvq", "rtvq"])
def test_ties_election_equals_dense_reference(stores, crafted, which):
    s = crafted if which == "crafted" else stores
    st = TaskVectorStore(s.paths["fp32" if which == "crafted" else which])
    taus = {key: st.task_vectors(key, TASKS, s.pre[key]) for key in st.keys}
    ref = _dense_ties_split(taus, st.keys)
    packed = PackedTaskVectors(st, s.pre, ties=True)
    for key in st.keys:
        for t in range(len(TASKS)):
            assert torch.equal(packed.dequantize(key, t), ref[key][t]), (key, t)
    if which == "crafted":     # exact ties and exactly-zero sums were exercised
        sums = sum(torch.cat([v.reshape(-1) for v in (taus[k][t] for k in st.keys)]) for t in range(len(TASKS)))
        assert bool((sums == 0).any())


def test_ties_merge_equals_ties_method(stores):
    """AdaMerging++ at lambda = 0.3 for every task is TIES-Merging (dis-sum, scaling 0.3)."""
    packed = PackedTaskVectors(stores.paths["tvq"], stores.pre, ties=TiesConfig(k=0.2))
    enc = stores.encoder()
    with torch.no_grad():
        ours = merged_params(packed, base_tensors(enc), torch.full((len(TASKS),), 0.3))
    ties = merge_state_dict(stores.paths["tvq"], stores.pre, "ties", scaling=0.3, k=0.2)
    for key, v in ours.items():
        torch.testing.assert_close(v, ties[key], rtol=0, atol=2e-7)


def test_errors(stores):
    other = {k: v.detach().clone() for k, v in tiny_pretrained(1, width=32, depth=1).state_dict().items()}
    with pytest.raises(FingerprintMismatch):
        PackedTaskVectors(stores.paths["tvq"], other)
    with pytest.raises(StoreError, match="no task 'nope'"):
        PackedTaskVectors(stores.paths["tvq"], stores.pre, tasks=["t0", "nope"])
