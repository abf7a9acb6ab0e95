"""Store errors, export and atomic writes: bad input gets one clear error and leaves nothing behind."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tvq_lightning.errors import (
    BudgetError,
    CheckpointError,
    FingerprintMismatch,
    IncompatibleWeights,
    NonFiniteError,
    OutputError,
    OutputExistsError,
    QuantConfigError,
    StoreError,
    TvqError,
)
from tvq_lightning.store import StoreConfig, TaskVectorStore, quantize_to_store
from tvq_lightning.store import writer as writer_mod
from tvq_lightning.store.checkpoints import load_state_dict
from tvq_lightning.store.export import export_task
from tvq_lightning.store.summary import bits_per_param

from _store_helpers import CONFIGS, assert_no_error_residue, build, reference  # noqa: E402


# --------------------------------------------------------------------------- errors


def _expect_error(tmp_path, snap, exc, match, fn):
    before = snap(tmp_path)
    with pytest.raises(exc, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    assert_no_error_residue(before, snap(tmp_path))
    return info.value


def test_missing_pretrained_file(tmp_path, files, snap):
    missing = files.root / "nope.safetensors"
    _expect_error(tmp_path, snap, CheckpointError, "nope.safetensors",
                  lambda: quantize_to_store(missing, files.fts, tmp_path / "s", progress=False))


def test_missing_finetuned_file(tmp_path, files, snap):
    fts = dict(files.fts, t3=files.root / "t3_missing.safetensors")
    _expect_error(tmp_path, snap, CheckpointError, "t3_missing.safetensors",
                  lambda: quantize_to_store(files.pre, fts, tmp_path / "s", progress=False))


@pytest.mark.parametrize("case", ["missing", "extra", "shape"])
def test_incompatible_finetuned(tmp_path, weights, make_files, snap, case):
    ft = weights.fts[1]
    if case == "missing":
        del ft["blocks.0.norm1.bias"]
        match = "blocks\\.0\\.norm1\\.bias"
    elif case == "extra":
        ft["head.weight"] = torch.zeros(4, 32)
        match = "head\\.weight"
    else:
        ft["blocks.0.linear1.weight"] = torch.zeros(64, 32)
        match = "blocks\\.0\\.linear1\\.weight.*\\(64, 32\\)"
    files = make_files(tmp_path / "ckpt", weights)
    err = _expect_error(tmp_path, snap, IncompatibleWeights, match,
                        lambda: quantize_to_store(files.pre, files.fts, tmp_path / "s", progress=False))
    assert "t1.safetensors" in str(err)


@pytest.mark.parametrize("scheme", ["tvq4", "rtvq_b3o2", "fp32", "fq4"])
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_task_vector(tmp_path, weights, make_files, snap, scheme, bad):
    key = "blocks.0.linear2.weight" if bad == "nan" else "ln_post.bias"  # a late key: files are half written
    weights.fts[2][key].view(-1)[3] = float("nan") if bad == "nan" else float("-inf")
    files = make_files(tmp_path / "ckpt", weights)
    err = _expect_error(tmp_path, snap, NonFiniteError, re.escape(key),
                        lambda: quantize_to_store(files.pre, files.fts, tmp_path / "s", CONFIGS[scheme], progress=False))
    assert "t2.safetensors" in str(err)


def test_non_finite_when_adding_leaves_store_unchanged(tmp_path, weights, make_files, snap):
    build(weights, tmp_path / "s", CONFIGS["tvq4"], tasks=[0]).close()
    weights.fts[1]["ln_post.weight"][0] = float("nan")
    files = make_files(tmp_path / "ckpt", weights)
    _expect_error(tmp_path, snap, NonFiniteError, "ln_post\\.weight",
                  lambda: quantize_to_store(files.pre, {"t1": files.fts["t1"]}, tmp_path / "s", progress=False))


def test_duplicate_task_names(tmp_path, files, snap):
    class Dup(dict):  # a mapping that yields a name twice (what a CLI list of NAME=PATH can hold)
        def __iter__(self):
            return iter(["t0", "t1", "t0"])

    _expect_error(tmp_path, snap, TvqError, "'t0'.*twice",
                  lambda: quantize_to_store(files.pre, Dup(files.fts), tmp_path / "s", progress=False))


def test_task_already_in_store(tmp_path, files, snap):
    quantize_to_store(files.pre, {"t0": files.fts["t0"]}, tmp_path / "s", progress=False)
    _expect_error(tmp_path, snap, TvqError, "'t0'.*already in store",
                  lambda: quantize_to_store(files.pre, {"t0": files.fts["t1"]}, tmp_path / "s", progress=False))


def test_bad_task_name(tmp_path, files, snap):
    _expect_error(tmp_path, snap, TvqError, "'a/b'",
                  lambda: quantize_to_store(files.pre, {"a/b": files.fts["t0"]}, tmp_path / "s", progress=False))


def test_fingerprint_mismatch_when_adding_and_exporting(tmp_path, weights, other_pretrained, snap):
    from tvq_lightning.testing import synthetic_finetunes

    out = tmp_path / "s"
    build(weights, out, CONFIGS["tvq4"], tasks=[0, 1]).close()
    other_ft = synthetic_finetunes(other_pretrained, 1, seed=3)[0]
    _expect_error(tmp_path, snap, FingerprintMismatch, re.escape(str(out)),
                  lambda: quantize_to_store(other_pretrained, {"t9": other_ft}, out, progress=False))
    dest = tmp_path / "t0.safetensors"
    _expect_error(tmp_path, snap, FingerprintMismatch, re.escape(str(out)),
                  lambda: export_task(out, "t0", dest, pretrained=other_pretrained, finetuned_weights=True))
    with pytest.raises(FingerprintMismatch):
        TaskVectorStore(out).check_pretrained(other_pretrained)
    TaskVectorStore(out).check_pretrained(weights.pre)


def test_other_keys_than_store_when_adding(tmp_path, weights, snap):
    out = tmp_path / "s"
    build(weights, out, CONFIGS["tvq4"], tasks=[0]).close()
    pre = dict(weights.pre, extra=torch.ones(3))
    ft = dict(weights.fts[1], extra=torch.ones(3))
    _expect_error(tmp_path, snap, TvqError, re.escape(str(out)),
                  lambda: quantize_to_store(pre, {"t1": ft}, out, progress=False))


def test_truncated_task_file(tmp_path, weights):
    store = build(weights, tmp_path / "s", CONFIGS["tvq4"])
    path = tmp_path / "s" / store.layout.tasks["t1"].file
    store.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    store = TaskVectorStore(tmp_path / "s")
    with pytest.raises(StoreError, match=re.escape(path.name)):
        store.task_vector("t1", "conv1.weight")
    assert torch.equal(store.task_vector("t0", "conv1.weight"), reference(weights, CONFIGS["tvq4"], "conv1.weight")[0])
    path.unlink()
    with pytest.raises(StoreError, match=re.escape(path.name)):
        TaskVectorStore(tmp_path / "s").task_vector("t1", "conv1.weight")


@pytest.mark.parametrize("content", [b"\x00\xffgarbage{", b'{"format": "something else"}', b"[1, 2]", b"",
                                     b'{"format": "tvq_lightning.store", "version": 1}',
                                     b'{"format": "tvq_lightning.store", "version": 99}'])
def test_garbage_layout(tmp_path, weights, content):
    build(weights, tmp_path / "s", CONFIGS["tvq4"]).close()
    (tmp_path / "s" / "layout.json").write_bytes(content)
    with pytest.raises(StoreError, match="layout.json") as info:
        TaskVectorStore(tmp_path / "s")
    assert "\n" not in str(info.value)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="nowhere"):
        TaskVectorStore(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="empty"):
        TaskVectorStore(tmp_path / "empty")


def test_unknown_task_and_key(tmp_path, weights):
    store = build(weights, tmp_path / "s", CONFIGS["tvq4"], tasks=[0])
    with pytest.raises(StoreError, match="'nope'"):
        store.task_vector("nope", "conv1.weight")
    with pytest.raises(StoreError, match="'nokey'"):
        store.task_vector("t0", "nokey")


@pytest.mark.parametrize("kw", [{"bits": 0}, {"bits": 9}, {"base_bits": 0, "scheme": "rtvq"},
                                {"offset_bits": 9, "scheme": "rtvq"}, {"bits": 2.5}])
def test_bits_out_of_range(kw):
    with pytest.raises(QuantConfigError, match="1..8"):
        StoreConfig(**kw)


@pytest.mark.parametrize("kw", [{"scheme": "int4"}, {"granularity": "row"}, {"granularity": "group", "group_size": 0},
                                {"policy": "bogus"}, {"scheme": "fp32", "budget": 3.0}])
def test_bad_config(kw):
    with pytest.raises(QuantConfigError):
        StoreConfig(**kw)


def test_symmetric_one_bit_is_refused(tmp_path, files, snap):
    """Symmetric quantization has no 1-bit form: refused (at the latest while writing), nothing left behind."""
    def go():
        quantize_to_store(files.pre, files.fts, tmp_path / "s", StoreConfig(symmetric=True, bits=1), progress=False)

    _expect_error(tmp_path, snap, QuantConfigError, "symmetric", go)


@pytest.mark.parametrize("scheme", ["tvq", "rtvq"])
def test_budget_too_small(tmp_path, files, snap, scheme):
    _expect_error(tmp_path, snap, BudgetError, "0.5",
                  lambda: quantize_to_store(files.pre, files.fts, tmp_path / "s", StoreConfig(scheme=scheme, budget=0.5),
                                            progress=False))


def test_budget_allocation(tmp_path, weights):
    store = build(weights, tmp_path / "s", StoreConfig(scheme="rtvq", budget=2.5, per_tensor_bits=True))
    assert store.layout.allocation is not None
    assert bits_per_param(store) <= 2.5 + 1e-9
    for k in weights.pre:
        assert torch.isfinite(store.task_vector("t0", k)).all()


def test_pickled_module_needs_allow_pickle(tmp_path, weights, snap):
    from tvq_lightning.testing import TinyEncoder

    model = TinyEncoder(width=32, depth=1)
    model.load_state_dict(weights.fts[0])
    path = tmp_path / "ft_module.pt"
    torch.save(model, path)
    err = _expect_error(tmp_path, snap, CheckpointError, "ft_module.pt",
                        lambda: quantize_to_store(weights.pre, {"t0": path}, tmp_path / "s", progress=False))
    assert "allow-pickle" in str(err) or "allow_pickle" in str(err)
    store = build_from(weights.pre, {"t0": path}, tmp_path / "s", allow_pickle=True)
    assert torch.equal(store.task_vector("t0", "conv1.weight"), reference(weights, CONFIGS["tvq4"], "conv1.weight")[0])


def build_from(pre, fts, out, cfg=StoreConfig(), **kw) -> TaskVectorStore:
    quantize_to_store(pre, fts, out, cfg, progress=False, **kw)
    return TaskVectorStore(out)


def test_output_exists_and_is_not_a_store(tmp_path, files, snap):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    _expect_error(tmp_path, snap, OutputExistsError, "taken",
                  lambda: quantize_to_store(files.pre, files.fts, tmp_path / "taken", progress=False))
    (tmp_path / "afile").write_text("x")
    _expect_error(tmp_path, snap, OutputExistsError, "afile",
                  lambda: quantize_to_store(files.pre, files.fts, tmp_path / "afile", progress=False))


def test_overwrite_replaces_store(tmp_path, files, weights):
    out = tmp_path / "s"
    quantize_to_store(files.pre, {"t0": files.fts["t0"]}, out, CONFIGS["tvq2"], progress=False)
    quantize_to_store(files.pre, files.fts, out, CONFIGS["tvq8"], overwrite=True, progress=False)
    store = TaskVectorStore(out)
    assert store.config == CONFIGS["tvq8"] and store.tasks == weights.names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "s"]


def test_no_finetuned_given(tmp_path, files):
    with pytest.raises(TvqError, match="no fine-tuned"):
        quantize_to_store(files.pre, {}, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- export


def _with_buffers(weights):
    """A BatchNorm-like integer buffer, and a float16 matrix, in every state dict."""
    for i, sd in enumerate([weights.pre, *weights.fts]):
        sd["bn.num_batches_tracked"] = torch.tensor(100 + i, dtype=torch.int64)
        sd["proj"] = sd["proj"].to(torch.float16)
    return weights


@pytest.mark.parametrize("name", ["tvq4", "rtvq_b3o2", "fq4", "fp32"])
def test_export_task_vector_and_finetuned(tmp_path, weights, make_files, name):
    weights = _with_buffers(weights)
    files = make_files(tmp_path / "ckpt", weights)
    cfg = CONFIGS[name]
    out = tmp_path / "s"
    quantize_to_store(files.pre, files.fts, out, cfg, progress=False)
    store = TaskVectorStore(out)
    assert "bn.num_batches_tracked" not in store.layout.keys
    assert store.layout.keys["proj"].dtype == "float16"

    tv_path = tmp_path / "tau.safetensors"
    pretrained = files.pre if cfg.scheme == "fq" else None
    n = export_task(out, "t1", tv_path, pretrained=pretrained)
    assert n == tv_path.stat().st_size
    tv = load_state_dict(tv_path)
    assert set(tv) == set(store.layout.keys)
    for k in store.keys:
        assert tv[k].dtype == torch.float32
        assert torch.equal(tv[k], store.task_vector("t1", k, weights.pre[k]))

    ft_path = tmp_path / "ft.safetensors"
    export_task(out, "t1", ft_path, pretrained=files.pre, finetuned_weights=True)
    ft = load_state_dict(ft_path)
    assert set(ft) == set(weights.pre)
    for k, p in weights.pre.items():
        assert ft[k].dtype == p.dtype and ft[k].shape == p.shape, k
        if not p.is_floating_point():
            assert torch.equal(ft[k], p)  # theta_0's buffer, not the fine-tuned 101
            continue
        assert torch.equal(ft[k], (p.float() + store.task_vector("t1", k, p)).to(p.dtype)), k
        if name == "fp32" and p.dtype == torch.float32:
            torch.testing.assert_close(ft[k], weights.fts[1][k], rtol=0, atol=1e-6)
    assert load_state_dict(ft_path)["bn.num_batches_tracked"].item() == 100


def test_export_errors(tmp_path, files, snap):
    out = tmp_path / "s"
    quantize_to_store(files.pre, files.fts, out, CONFIGS["fq4"], progress=False)
    dest = tmp_path / "x.safetensors"
    _expect_error(tmp_path, snap, StoreError, "pretrained", lambda: export_task(out, "t0", dest))
    _expect_error(tmp_path, snap, StoreError, "'nope'", lambda: export_task(out, "nope", dest, pretrained=files.pre))
    _expect_error(tmp_path, snap, OutputError, "missing_dir",
                  lambda: export_task(out, "t0", tmp_path / "missing_dir" / "x.safetensors", pretrained=files.pre))
    dest.write_text("keep me")
    _expect_error(tmp_path, snap, OutputExistsError, "x.safetensors",
                  lambda: export_task(out, "t0", dest, pretrained=files.pre))
    err = _expect_error(tmp_path, snap, OutputExistsError, "already exists and is not a safetensors file written by tvq",  # not ours
                        lambda: export_task(out, "t0", dest, pretrained=files.pre, overwrite=True))
    assert "--overwrite" not in str(err)
    dest.unlink()
    export_task(out, "t0", dest, pretrained=files.pre)
    export_task(out, "t0", dest, pretrained=files.pre, overwrite=True)  # ours: replaced
    assert set(load_state_dict(dest)) == set(TaskVectorStore(out).keys)


# --------------------------------------------------------------------------- atomic writes


class Crash(RuntimeError):
    pass


def _crash_after(monkeypatch, target: str, n: int):
    calls = {"n": 0}
    orig = getattr(writer_mod, target)

    def wrapped(*a, **kw):
        calls["n"] += 1
        if calls["n"] > n:
            raise Crash(f"simulated crash in call {calls['n']}")
        return orig(*a, **kw)

    monkeypatch.setattr(writer_mod, target, wrapped)
    import tvq_lightning.store.encode as encode_mod

    monkeypatch.setattr(encode_mod, target, wrapped)
    return calls


def test_crash_while_creating_leaves_nothing(tmp_path, files, snap, monkeypatch):
    before = snap(tmp_path)
    calls = _crash_after(monkeypatch, "encode_single", 5)
    with pytest.raises(Crash):
        quantize_to_store(files.pre, files.fts, tmp_path / "s", CONFIGS["tvq4"], progress=False)
    assert calls["n"] == 6
    assert not (tmp_path / "s").exists()
    assert snap(tmp_path) == before


def test_crash_while_overwriting_keeps_old_store(tmp_path, files, snap, monkeypatch):
    quantize_to_store(files.pre, {"t0": files.fts["t0"]}, tmp_path / "s", CONFIGS["tvq2"], progress=False)
    before = snap(tmp_path)
    _crash_after(monkeypatch, "encode_single", 5)
    with pytest.raises(Crash):
        quantize_to_store(files.pre, files.fts, tmp_path / "s", CONFIGS["tvq4"], overwrite=True, progress=False)
    assert snap(tmp_path) == before


@pytest.mark.parametrize("name", ["tvq4", "rtvq_b3o2", "rtvq_b3o2-recompute"])
def test_crash_while_adding_leaves_store_identical(tmp_path, files, snap, monkeypatch, name):
    cfg = CONFIGS[name.split("-")[0]]
    rtvq_base = "recompute" if name.endswith("recompute") else "frozen"
    out = tmp_path / "s"
    quantize_to_store(files.pre, {"t0": files.fts["t0"], "t1": files.fts["t1"]}, out, cfg, progress=False)
    before = snap(tmp_path)
    target = "encode_joint" if rtvq_base == "recompute" else "encode_single"
    _crash_after(monkeypatch, target, 5 if target == "encode_single" else 2)
    with pytest.raises(Crash):
        quantize_to_store(files.pre, {"t2": files.fts["t2"]}, out, cfg, rtvq_base=rtvq_base, progress=False)
    assert snap(tmp_path) == before
    monkeypatch.undo()
    quantize_to_store(files.pre, {"t2": files.fts["t2"]}, out, cfg, rtvq_base=rtvq_base, progress=False)
    assert TaskVectorStore(out).tasks == ["t0", "t1", "t2"]


def test_crash_while_writing_layout_when_adding(tmp_path, files, snap, monkeypatch):
    out = tmp_path / "s"
    quantize_to_store(files.pre, {"t0": files.fts["t0"]}, out, CONFIGS["tvq4"], progress=False)
    before = snap(tmp_path)

    def boom(*a, **kw):
        raise Crash("disk full")

    monkeypatch.setattr(writer_mod, "atomic_write_json", boom)
    with pytest.raises(Crash):
        quantize_to_store(files.pre, {"t1": files.fts["t1"]}, out, progress=False)
    assert snap(tmp_path) == before


def test_layout_json_is_valid_and_versioned(tmp_path, weights):
    build(weights, tmp_path / "s", CONFIGS["rtvq_b3o2"]).close()
    data = json.loads((tmp_path / "s" / "layout.json").read_text())
    assert data["format"] == "tvq_lightning.store" and data["version"] == 2
    crcs = [t["crc32"] for t in data["tasks"].values()] + [data["base"]["crc32"]]
    assert all(re.fullmatch(r"[0-9a-f]{8}( [0-9a-f]{8})+", c) for c in crcs)  # header, then every tensor
    assert isinstance(data["layout_crc32"], int)
    assert data["config"]["scheme"] == "rtvq" and data["config"]["error_correction"] is True
    assert list(data["tasks"]) == ["t0", "t1", "t2"]
    assert data["pretrained"]["fingerprint"] == TaskVectorStore(tmp_path / "s").fingerprint
    assert ":" in data["pretrained"]["fingerprint"]

