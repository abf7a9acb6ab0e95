"""The cache-blocked per-tensor TVQ path (store/fused.py) writes the same bytes as the general path."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tvq_lightning.errors import NonFiniteError
from tvq_lightning.quant import kernels
from tvq_lightning.store import StoreConfig, TaskVectorStore, fused, quantize_to_store
from tvq_lightning.store.fingerprint import fingerprint_state_dict

from _store_helpers import reference  # noqa: E402

pytestmark = pytest.mark.skipif(kernels.numba is None, reason="numba is not installed")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _build(weights, out: Path, cfg: StoreConfig, use_fused: bool, monkeypatch, chunk: int = 64) -> dict[str, bytes]:
    calls = []

    class Recording(fused.KeyJob):  # what the writer starts per fused key
        def __init__(self, *a, **k):
            calls.append(a[0])
            super().__init__(*a, **k)

    monkeypatch.setattr(fused, "CHUNK", chunk)  # several chunks per key, cut into one part per thread
    monkeypatch.setattr(fused, "STAGE_BYTES", 40)  # several writes per part
    monkeypatch.setattr(fused, "KeyJob", Recording)
    monkeypatch.setattr(fused, "eligible", fused.eligible if use_fused else lambda *a: False)
    quantize_to_store(weights.pre, dict(zip(weights.names, weights.fts)), out, cfg, progress=False)
    assert bool(calls) == use_fused
    return _files(out)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_fused_files_equal_the_general_path(tmp_path, weights, bits, threads, monkeypatch):
    monkeypatch.setenv("TVQ_NUM_THREADS", threads)
    key = "blocks.0.linear1.weight"
    weights.fts[1][key] = weights.pre[key].clone()  # a key that is zero in one task only
    cfg = StoreConfig("tvq", bits=bits)
    got = _build(weights, tmp_path / "fused", cfg, True, monkeypatch)
    assert got == _build(weights, tmp_path / "general", cfg, False, monkeypatch)
    store = TaskVectorStore(tmp_path / "fused")
    assert store.layout.fingerprint == fingerprint_state_dict(weights.pre)
    for k in weights.pre:
        for i, t in enumerate(weights.names):
            assert torch.equal(store.task_vector(t, k, weights.pre[k]), reference(weights, cfg, k)[i]), (k, t)
    store.close()


def test_fused_files_from_checkpoint_files(tmp_path, weights, files, monkeypatch):
    """The memory-mapped checkpoints (the CLI's input) take the fused path too, one chunk per key."""
    cfg = StoreConfig("tvq", bits=4)
    quantize_to_store(files.pre, files.fts, tmp_path / "a", cfg, progress=False)
    got = _files(tmp_path / "a")
    want = _build(weights, tmp_path / "b", cfg, False, monkeypatch)
    assert got.pop("layout.json") != want.pop("layout.json")  # it names the sources
    assert got == want


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("key", ["blocks.0.linear2.weight", "blocks.0.linear2.bias"])  # a fused key, a small one
def test_fused_non_finite_names_task_and_key(tmp_path, weights, bad, key, monkeypatch):
    weights.fts[2][key].view(-1)[-1] = float(bad)
    monkeypatch.setattr(fused, "CHUNK", 16)
    with pytest.raises(NonFiniteError, match=rf"t2.*{key}"):
        quantize_to_store(weights.pre, dict(zip(weights.names, weights.fts)), tmp_path / "s",
                          StoreConfig("tvq", bits=4), progress=False)
    assert not (tmp_path / "s").exists()


def test_only_per_tensor_tvq_of_float32_is_fused(weights):
    from tvq_lightning.store.layout import KeyInfo

    info = KeyInfo((4, 4), "float32", True, bits=4)
    t = torch.zeros(4, 4)
    assert fused.eligible(StoreConfig("tvq", bits=4), info, [t, t])
    assert not fused.eligible(StoreConfig("tvq", bits=4, granularity="channel"), info, [t, t])
    assert not fused.eligible(StoreConfig("fq", bits=4), info, [t, t])
    assert not fused.eligible(StoreConfig("tvq", bits=4), info, [t, t.half()])
    assert not fused.eligible(StoreConfig("tvq", bits=4), info, [t, t.t()[:, :2]])
