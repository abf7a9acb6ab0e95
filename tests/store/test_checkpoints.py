"""Tests for tvq_lightning.store.checkpoints and tvq_lightning.store.fingerprint."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from tvq_lightning.errors import CheckpointError
from tvq_lightning.store.checkpoints import (
    LazyStateDict,
    common_prefixes,
    load_state_dict,
    open_checkpoint,
    read_safetensors_header,
)
from tvq_lightning.store.fingerprint import FINGERPRINT_ALGORITHM, fingerprint_state_dict, short_fingerprint

_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
] + [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]


def _sample(dtype: torch.dtype, shape=(3, 5)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


@pytest.fixture
def sd() -> dict[str, torch.Tensor]:
    out = {f"t_{str(d).removeprefix('torch.')}": _sample(d) for d in _DTYPES}
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.empty(0, 4)
    return out


def _write_st(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return path


# --------------------------------------------------------------------------- safetensors


def test_safetensors_round_trip_every_dtype(tmp_path, sd):
    path = _write_st(tmp_path / "w.safetensors", sd, metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # frombuffer on a read-only buffer would warn
        with open_checkpoint(path) as lazy:
            assert isinstance(lazy, LazyStateDict) and lazy.format == "safetensors"
            assert set(lazy) == set(sd) and len(lazy) == len(sd) and "scalar" in lazy
            assert lazy.metadata == {"format": "pt"}
            for k, v in sd.items():
                assert _same(lazy[k], v), k
                assert lazy.meta(k) == (tuple(v.shape), v.dtype)
            assert lazy["scalar"].shape == () and lazy["empty"].shape == (0, 4)
    assert lazy.closed
    loaded = load_state_dict(path)
    assert set(loaded) == set(sd) and all(_same(loaded[k], sd[k]) for k in sd)


def test_tensors_outlive_close_and_writes_do_not_reach_file(tmp_path):
    path = _write_st(tmp_path / "w.safetensors", {"a": torch.arange(6.0)})
    lazy = open_checkpoint(path)
    t = lazy["a"]
    lazy.close()
    t += 1  # copy-on-write mapping: writable, private
    assert torch.equal(t, torch.arange(6.0) + 1)
    assert torch.equal(load_state_dict(path)["a"], torch.arange(6.0))
    with pytest.raises(CheckpointError, match="closed"):
        lazy["a"]


def test_meta_does_not_read_data(tmp_path, sd, monkeypatch):
    path = _write_st(tmp_path / "w.safetensors", sd)
    lazy = open_checkpoint(path)

    def boom(*a, **k):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(torch, "frombuffer", boom)
    assert lazy.meta("t_bfloat16") == ((3, 5), torch.bfloat16)
    assert lazy.meta("empty") == ((0, 4), torch.float32)
    with pytest.raises(KeyError):
        lazy.meta("nope")


def test_read_header_and_unaligned_offsets(tmp_path):
    # One byte of U8, then an F32 tensor at a 1-byte (unaligned) offset.
    vals = torch.tensor([1.5, -2.0, 3.25])
    header = {
        "u": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "f": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]},
        "__metadata__": {"k": "v"},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\x07" + vals.numpy().tobytes())
    entries, meta, start = read_safetensors_header(path)
    assert list(entries) == ["u", "f"] and meta == {"k": "v"} and start == 8 + len(raw)
    lazy = open_checkpoint(path)
    assert torch.equal(lazy["f"], vals) and lazy["f"].data_ptr() % 4 == 0
    assert lazy["u"].tolist() == [7]


def test_truncated_safetensors(tmp_path):
    path = _write_st(tmp_path / "w.safetensors", {"a": torch.randn(64, 64), "b": torch.randn(64)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file") as ei:
        open_checkpoint(path)
    assert str(path) in str(ei.value) and "\n" not in str(ei.value)
    path.write_bytes(data[:20])  # header itself cut
    with pytest.raises(CheckpointError, match="re-export it"):
        read_safetensors_header(path)


@pytest.mark.parametrize("name", ["junk.safetensors", "junk.pt", "junk.weights", "empty.safetensors"])
def test_garbage_bytes(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"" if name.startswith("empty") else bytes(range(256)) * 16)
    with pytest.raises(CheckpointError) as ei:
        open_checkpoint(path)
    assert str(path) in str(ei.value) and "\n" not in str(ei.value)


def test_unknown_extension_sniffs_format(tmp_path):
    t = {"a": torch.ones(2)}
    st = _write_st(tmp_path / "weights.data", t)
    assert open_checkpoint(st).format == "safetensors"
    pt = tmp_path / "weights.other"
    torch.save(t, pt)
    assert open_checkpoint(pt).format == "torch" and torch.equal(load_state_dict(pt)["a"], t["a"])


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such file; check the path"):
        open_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="holds no weights: looked for model.safetensors"):
        open_checkpoint(tmp_path)     # a directory is read as a model folder


# --------------------------------------------------------------------------- torch formats


def test_pt_state_dict(tmp_path, sd):
    path = tmp_path / "w.pt"
    torch.save({**sd, "_extra_state": {"x": 1}, "version": 3}, path)
    lazy = open_checkpoint(path)
    assert lazy.format == "torch" and set(lazy) == set(sd)
    for k, v in sd.items():
        assert _same(lazy[k], v) and lazy.meta(k) == (tuple(v.shape), v.dtype)


def test_legacy_non_zip_pt(tmp_path):
    path = tmp_path / "legacy.bin"
    torch.save({"w": torch.arange(4)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_state_dict(path)["w"], torch.arange(4))


def test_ckpt_state_dict_and_prefixes(tmp_path):
    model = {
        "model.encoder.layer.weight": torch.randn(4, 4),
        "model.encoder.layer.bias": torch.randn(4),
        "model.head.weight": torch.randn(2, 4),
    }
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 1, "global_step": 10, "state_dict": model, "optimizer_states": [],
                "hyper_parameters": {"lr": 0.1}}, path)
    assert set(load_state_dict(path)) == set(model)
    sd = load_state_dict(path, prefix="model.")
    assert set(sd) == {"encoder.layer.weight", "encoder.layer.bias", "head.weight"}
    assert torch.equal(sd["head.weight"], model["model.head.weight"])
    enc = load_state_dict(path, prefix="model.encoder.")
    assert set(enc) == {"layer.weight", "layer.bias"}
    assert set(load_state_dict(path, prefix="")) == set(model)


def test_nested_model_key(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"model": {"a.w": torch.ones(1)}, "step": 3}, path)
    assert list(load_state_dict(path)) == ["a.w"]


def test_wrong_prefix_lists_available(tmp_path):
    path = _write_st(tmp_path / "w.safetensors", {"model.encoder.w": torch.ones(1), "model.head.w": torch.ones(1)})
    with pytest.raises(CheckpointError) as ei:
        open_checkpoint(path, prefix="net.")
    msg = str(ei.value)
    assert str(path) in msg and "'net.'" in msg and "'model.'" in msg and "'model.encoder.'" in msg
    assert "\n" not in msg


def test_common_prefixes():
    keys = ["model.encoder.layer.w", "model.encoder.layer.b", "model.head.w", "scale"]
    assert common_prefixes(keys) == [
        "model.", "model.encoder.", "model.head.", "model.encoder.layer.",
    ]
    assert common_prefixes(keys, max_depth=1) == ["model."]


def test_pickled_module_needs_allow_pickle(tmp_path):
    lin = torch.nn.Linear(3, 2)
    path = tmp_path / "finetuned.pt"
    torch.save(lin, path)
    with pytest.raises(CheckpointError, match="pickled Python objects.*allow-pickle.*allow-list") as ei:
        open_checkpoint(path)
    assert str(path) in str(ei.value) and "\n" not in str(ei.value)
    for opt_in in ({"allow_pickle": True}, {"trust_pickle_code": True}):  # the allow-list, or torch.load
        sd = load_state_dict(path, **opt_in)
        assert set(sd) == {"weight", "bias"} and torch.equal(sd["weight"], lin.weight.detach())
        assert not sd["weight"].requires_grad


@pytest.mark.parametrize("gone", ["module", "class"])
def test_pickled_module_whose_code_is_missing_names_it(tmp_path, monkeypatch, gone):
    """A class outside the allow-list is refused by --allow-pickle, naming it; with --trust-pickle-code
    (torch.load, code from the file runs), a class this interpreter cannot import names the missing
    module (or class) and the fixes, instead of asking to "re-export" it."""
    import importlib
    import sys

    code = tmp_path / "code"
    code.mkdir()
    (code / "tvq_test_nets.py").write_text("import torch\nclass Net(torch.nn.Linear):\n    pass\n")
    monkeypatch.syspath_prepend(str(code))
    net = importlib.import_module("tvq_test_nets").Net(3, 2)
    path = tmp_path / "net.pt"
    torch.save(net, path)
    monkeypatch.delitem(sys.modules, "tvq_test_nets")
    if gone == "module":
        monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(code)])
        needle = "module 'tvq_test_nets'"
    else:
        (code / "tvq_test_nets.py").write_text("X = 1\n")
        needle = "class tvq_test_nets.Net"
    with pytest.raises(CheckpointError, match="'tvq_test_nets.Net' is not an allowed class; the file was not loaded"):
        load_state_dict(path, allow_pickle=True)
    with pytest.raises(CheckpointError) as ei:
        load_state_dict(path, trust_pickle_code=True)
    msg = str(ei.value)
    assert needle in msg and "PYTHONPATH" in msg and ".safetensors" in msg and str(path) in msg, msg
    assert "re-export" not in msg and "\n" not in msg


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint(tmp_path, sd):
    fp = fingerprint_state_dict(sd)
    prefix = FINGERPRINT_ALGORITHM + ":"
    assert fp.startswith(prefix) and len(fp) == len(prefix) + 64
    assert fingerprint_state_dict(dict(reversed(list(sd.items())))) == fp  # order-independent
    path = _write_st(tmp_path / "w.safetensors", sd)
    assert fingerprint_state_dict(open_checkpoint(path)) == fp  # lazy, mmap-backed
    changed = {k: v.clone() for k, v in sd.items()}
    changed["t_float32"][1, 2] += 1
    assert fingerprint_state_dict(changed) != fp
    renamed = dict(sd)
    renamed["t_float32_renamed"] = renamed.pop("t_float32")
    assert fingerprint_state_dict(renamed) != fp
    recast = dict(sd, scalar=sd["scalar"].double())
    assert fingerprint_state_dict(recast) != fp
    assert fingerprint_state_dict({"a": torch.arange(6.0).view(2, 3).t()}) == fingerprint_state_dict(
        {"a": torch.arange(6.0).view(2, 3).t().contiguous()}
    )
    assert short_fingerprint(fp) == fp[: len(prefix) + 12]
    # one flipped bit anywhere in a large tensor (not only in the first bytes) changes it
    big = {"w": torch.randn(1000, 77)}
    flipped = {"w": big["w"].clone()}
    flipped["w"].view(-1).view(torch.int32)[54321] ^= 1
    assert fingerprint_state_dict(big) != fingerprint_state_dict(flipped)
    # per-key entries combine to the same fingerprint in any order
    from tvq_lightning.store.fingerprint import combine_entries, tensor_entry
    entries = {k: tensor_entry(v) for k, v in reversed(list(sd.items()))}
    assert combine_entries(entries) == fp
