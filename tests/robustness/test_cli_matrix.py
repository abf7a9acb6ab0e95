"""Bad input to ``tvq quantize / merge / inspect / export``, in-process: every case ends with exit
status 2 and one line ``tvq: error: ...`` naming the culprit, and leaves every file that existed
before byte-identical (and nothing new)."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from _damage import edit_layout, edit_sd, flip_bit, flip_tensor, task_file, truncate
from _robust_helpers import assert_refused, tree_hash

Q = "quantize"


def _quantize(w, *extra, fts=None, out=None):
    return [Q, "--pretrained", w.pre, "--finetuned", *(fts or w.ft_args()), "--out", out or w.root / "new", "--quiet", *extra]


def _merge(w, *extra, method="task_arithmetic", store="tvq", pre=None, out=None):
    return ["merge", "--pretrained", pre or w.pre, "--store", w.store(store), "--method", method,
            "--out", out or w.root / "m.safetensors", "--quiet", *extra]


def _export(w, *extra, task="t0", store="tvq", out=None):
    return ["export", "--store", w.store(store), "--task", task, "--out", out or w.root / "x.safetensors", *extra]


# ------------------------------------------------------------------ damaged inputs, by file


def _pre_damage(kind):
    def damage(w):
        p = w.pre
        if kind == "missing":
            p.unlink()
        elif kind == "empty":
            p.write_bytes(b"")
        elif kind == "truncated":
            truncate(p)
        elif kind == "garbage":
            p.write_bytes(b"\x00\x01garbage" * 10)
        elif kind == "header_flip":
            flip_bit(p, 12, 5)
        elif kind == "huge_header_len":
            data = bytearray(p.read_bytes())
            data[0:8] = (1 << 62).to_bytes(8, "little")
            p.write_bytes(bytes(data))
        elif kind == "directory":
            p.unlink()
            p.mkdir()
        return "pre"
    return damage


PRE_KINDS = ["missing", "empty", "truncated", "garbage", "header_flip", "huge_header_len", "directory"]


@pytest.mark.parametrize("kind", PRE_KINDS)
@pytest.mark.parametrize("command", ["quantize", "merge", "export_finetuned"])
def test_damaged_pretrained(world, tvq, kind, command):
    _pre_damage(kind)(world)
    argv = {"quantize": _quantize(world), "merge": _merge(world),
            "export_finetuned": _export(world, "--pretrained", world.pre, "--finetuned-weights")}[command]
    before = tree_hash(world.root)
    assert_refused(tvq(*argv), "pre")
    assert tree_hash(world.root) == before


def _ft_damage(kind):
    def damage(w):
        p = w.ft("t1")
        if kind in ("missing", "empty", "truncated", "garbage"):
            {"missing": p.unlink, "empty": lambda: p.write_bytes(b""), "truncated": lambda: truncate(p),
             "garbage": lambda: p.write_bytes(b"PK\x03\x04 not a zip")}[kind]()
        elif kind == "missing_key":
            edit_sd(p, lambda sd: sd.pop("blocks.0.linear1.bias"))
        elif kind == "extra_key":
            edit_sd(p, lambda sd: sd.__setitem__("extra.weight", torch.ones(3)))
        elif kind == "transposed":
            edit_sd(p, lambda sd: sd.__setitem__("proj", sd["proj"].t().contiguous()))
        elif kind == "int32":
            edit_sd(p, lambda sd: sd.__setitem__("proj", sd["proj"].to(torch.int32)))
        elif kind == "nan":
            edit_sd(p, lambda sd: sd["blocks.0.linear2.weight"].view(-1).__setitem__(5, float("nan")))
        elif kind == "inf":
            edit_sd(p, lambda sd: sd["ln_post.bias"].__setitem__(0, float("inf")))
        elif kind == "other_model":
            edit_sd(p, lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("blocks")])
    return damage


FT_KINDS = {"missing": "t1", "empty": "t1", "truncated": "t1", "garbage": "t1", "missing_key": "linear1.bias",
            "extra_key": "extra.weight", "transposed": "'proj'", "int32": "int32", "nan": "NaN", "inf": "Inf",
            "other_model": "t1"}


@pytest.mark.parametrize("kind", list(FT_KINDS))
def test_damaged_finetuned(world, tvq, kind):
    _ft_damage(kind)(world)
    before = tree_hash(world.root)
    assert_refused(tvq(*_quantize(world)), FT_KINDS[kind])
    assert tree_hash(world.root) == before


@pytest.mark.parametrize("kind", list(FT_KINDS))
def test_damaged_finetuned_when_adding(world, tvq, kind):
    """Adding a damaged task to an existing store: refused, the store unchanged."""
    _ft_damage(kind)(world)
    before = tree_hash(world.root)
    argv = [Q, "--pretrained", world.pre, "--finetuned", f"t9={world.ft('t1')}", "--out", world.store(), "--quiet"]
    assert_refused(tvq(*argv), FT_KINDS[kind] if kind not in ("missing", "empty", "truncated", "garbage", "other_model") else "t1")
    assert tree_hash(world.root) == before


def _store_damage(kind, store="tvq"):
    def damage(w):
        s = w.store(store)
        tf = task_file(s, "t1")
        key = "blocks.0.linear1.weight"
        if kind == "layout_missing":
            (s / "layout.json").unlink()
        elif kind == "layout_empty":
            (s / "layout.json").write_bytes(b"")
        elif kind == "layout_truncated":
            truncate(s / "layout.json")
        elif kind == "layout_bitflip":
            raw = (s / "layout.json").read_bytes()
            flip_bit(s / "layout.json", raw.index(b'"shape"') + 12, 0)  # a digit of a shape
        elif kind == "layout_lost_key":  # crafted: checksum recomputed
            edit_layout(s, lambda d: d["keys"].pop(key))
        elif kind == "layout_transposed":
            edit_layout(s, lambda d: d["keys"][key].__setitem__("shape", d["keys"][key]["shape"][::-1]))
        elif kind == "layout_huge_shape":
            edit_layout(s, lambda d: d["keys"][key].__setitem__("shape", [100000, 100000]))
        elif kind == "layout_dtype":
            edit_layout(s, lambda d: d["keys"][key].__setitem__("dtype", "float16"))
        elif kind == "layout_version":
            edit_layout(s, lambda d: d.__setitem__("version", 99))
        elif kind == "layout_escape":
            edit_layout(s, lambda d: d["tasks"]["t1"].__setitem__("file", "../../ckpt/pre.safetensors"))
        elif kind == "task_missing":
            tf.unlink()
        elif kind == "task_truncated":
            truncate(tf)
        elif kind == "task_codes_flip":
            flip_tensor(tf, key + "#q", 3)
        elif kind == "task_scale_flip":
            flip_tensor(tf, key + "#s", 2)
        elif kind == "task_header_flip":
            raw = tf.read_bytes()
            flip_bit(tf, raw.index(b'"pretrained"') + 3, 1)  # inside the metadata: still valid JSON
        elif kind == "task_swapped":
            tf.write_bytes(task_file(s, "t0").read_bytes())
        return "store"
    return damage


STORE_KINDS = {"layout_missing": "layout.json", "layout_empty": "layout.json", "layout_truncated": "layout.json",
               "layout_bitflip": "layout.json", "layout_lost_key": "linear1.weight", "layout_transposed": "linear1.weight",
               "layout_huge_shape": "linear1.weight", "layout_dtype": "linear1.weight", "layout_version": "99",
               "layout_escape": "layout.json", "task_missing": "t1.g1", "task_truncated": "t1.g1",
               "task_codes_flip": "checksum", "task_scale_flip": "checksum", "task_header_flip": "checksum",
               "task_swapped": "checksum"}


@pytest.mark.parametrize("kind", list(STORE_KINDS))
@pytest.mark.parametrize("command", ["merge", "export"])
def test_damaged_store(world, tvq, kind, command):
    _store_damage(kind)(world)
    before = tree_hash(world.root)
    argv = _merge(world) if command == "merge" else _export(world, "--pretrained", world.pre, task="t1")
    assert_refused(tvq(*argv), STORE_KINDS[kind])
    assert tree_hash(world.root) == before


@pytest.mark.parametrize("kind", ["layout_missing", "layout_truncated", "layout_bitflip", "layout_escape", "task_missing",
                                  "layout_version"])
def test_damaged_store_inspect(world, tvq, kind):
    _store_damage(kind)(world)
    before = tree_hash(world.root)
    assert_refused(tvq("inspect", world.store()), STORE_KINDS[kind])
    assert tree_hash(world.root) == before


def test_rtvq_base_flip(world, tvq):
    s = world.store("rtvq")
    base = s / json.loads((s / "layout.json").read_text())["base"]["file"]
    flip_tensor(base, "blocks.0.linear1.weight#q", 1)
    before = tree_hash(world.root)
    assert_refused(tvq(*_merge(world, store="rtvq")), "base", "checksum")
    assert tree_hash(world.root) == before


# ------------------------------------------------------------------ options


MERGE_OPTIONS = [
    ("task_arithmetic", ["--scaling", "nan"], "scaling"), ("task_arithmetic", ["--scaling", "inf"], "scaling"),
    ("task_arithmetic", ["--scaling", "-inf"], "scaling"), ("task_arithmetic", ["--scaling", "abc"], "scaling"),
    ("ties", ["--k", "0"], "k="), ("ties", ["--k", "1.5"], "k="), ("ties", ["--k", "nan"], "--k"),
    ("ties", ["--scaling", "nan"], "scaling"), ("ties", ["--merge", "dis-max"], "merge"),
    ("dare", ["--p", "1"], "p="), ("dare", ["--p", "-0.1"], "p="), ("dare", ["--p", "nan"], "--p"),
    ("dare", ["--seed", "x"], "seed"), ("dare", ["--scaling", "inf"], "scaling"),
    ("breadcrumbs", ["--beta", "2"], "beta"), ("breadcrumbs", ["--beta", "0.5", "--gamma", "0.6"], "beta + gamma"),
    ("breadcrumbs", ["--gamma", "nan"], "gamma"), ("consensus", ["--k", "-1"], "k="),
    ("consensus", ["--lambdas", "-1"], "lambdas"), ("consensus", ["--scaling", "nan"], "scaling"),
    ("lines", ["--alpha", "nan"], "alpha"), ("lines", ["--beta", "inf"], "beta"), ("magmax", ["--scaling", "nan"], "scaling"),
    ("task_arithmetic", ["--tasks", "t0", "t0"], "'t0'"), ("task_arithmetic", ["--tasks", "zzz"], "'zzz'"),
    ("task_arithmetic", ["--tasks", "../t0"], "'../t0'"), ("task_arithmetic", ["--device", "bogus"], "--device"),
    ("nomethod", [], "nomethod"),
]


@pytest.mark.parametrize("method,extra,fragment", MERGE_OPTIONS, ids=[f"{m}{'_'.join(e)}" for m, e, _ in MERGE_OPTIONS])
def test_merge_option_out_of_range(world, tvq, method, extra, fragment):
    before = tree_hash(world.root)
    assert_refused(tvq(*_merge(world, *extra, method=method)), fragment)
    assert tree_hash(world.root) == before


QUANTIZE_OPTIONS = [(["--bits", "0"], "1..8"), (["--bits", "9"], "1..8"), (["--bits", "-1"], "1..8"),
                    (["--bits", "nan"], "bits"), (["--scheme", "int4"], "int4"), (["--granularity", "row"], "row"),
                    (["--granularity", "group", "--group_size", "0"], "group"), (["--policy", "bogus"], "bogus"),
                    (["--budget", "nan"], "budget"), (["--budget", "inf"], "budget"), (["--budget", "-1"], "budget"),
                    (["--budget", "0.1"], "0.1"), (["--scheme", "fp32", "--budget", "3"], "budget")]


@pytest.mark.parametrize("extra,fragment", QUANTIZE_OPTIONS, ids=["_".join(e) for e, _ in QUANTIZE_OPTIONS])
def test_quantize_option_out_of_range(world, tvq, extra, fragment):
    before = tree_hash(world.root)
    assert_refused(tvq(*_quantize(world, *extra)), fragment)
    assert tree_hash(world.root) == before


TASK_NAMES = [("t0=A t0=B", "'t0'"), ("../x=A", "'../x'"), ("a/b=A", "'a/b'"), (".hidden=A", "'.hidden'"),
              ("=A", "NAME=PATH"), ("t0", "NAME=PATH"), ("-x=A", "--finetuned"), ("con\nsole=A", "con")]


@pytest.mark.parametrize("spec,fragment", TASK_NAMES, ids=[f"name{i}" for i in range(len(TASK_NAMES))])
def test_bad_task_names(world, tvq, spec, fragment):
    fts = [s.replace("=A", f"={world.ft('t0')}").replace("=B", f"={world.ft('t1')}") for s in spec.split(" ")]
    before = tree_hash(world.root)
    assert_refused(tvq(*_quantize(world, fts=fts)), fragment)
    assert tree_hash(world.root) == before


# ------------------------------------------------------------------ existing outputs


def _user_dir(w):
    d = w.root / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    return d


OUTPUT_CASES = {
    "quantize_user_dir": (lambda w: _quantize(w, out=_user_dir(w)), "not a store"),
    "quantize_user_dir_overwrite": (lambda w: _quantize(w, "--overwrite", out=_user_dir(w)), "not a store"),
    "quantize_out_is_file": (lambda w: _quantize(w, out=w.pre), "not a store"),
    "quantize_out_is_file_overwrite": (lambda w: _quantize(w, "--overwrite", out=w.pre), "is a file"),
    "quantize_parent_is_file": (lambda w: _quantize(w, out=w.pre / "s"), "not a directory"),
    "quantize_out_artifact_overwrite": (lambda w: _quantize(w, "--overwrite", out=w.merged), "is a file"),
    "merge_user_file": (lambda w: _merge(w, out=w.ft("t0")), "not a merged safetensors"),
    "merge_user_file_overwrite": (lambda w: _merge(w, "--overwrite", out=w.ft("t0")), "not a merged safetensors"),
    "merge_out_is_dir": (lambda w: _merge(w, "--overwrite", out=w.store()), "is a directory"),
    "merge_out_dot": (lambda w: _merge(w, "--overwrite", out="."), "is a directory"),
    "merge_parent_missing": (lambda w: _merge(w, out=w.root / "no" / "m.safetensors"), "no such directory"),
    "merge_parent_is_file": (lambda w: _merge(w, out=w.pre / "m.safetensors"), "not a directory"),
    "merge_existing_merged": (lambda w: _merge(w, out=w.merged), "--overwrite"),
    "emr_user_dir_overwrite": (lambda w: _merge(w, "--overwrite", method="emr", out=_user_dir(w)), "not a per-task"),
    "emr_store_overwrite": (lambda w: _merge(w, "--overwrite", method="emr", out=w.store("fp32")), "not a per-task"),
    "emr_out_file": (lambda w: _merge(w, method="emr", out=w.root / "e.safetensors"), "directory"),
    "emr_out_dot": (lambda w: _merge(w, "--overwrite", method="emr", out="."), "not a per-task"),
    "export_user_file_overwrite": (lambda w: _export(w, "--overwrite", out=w.ft("t0")), "not a safetensors file"),
    "export_store_file_overwrite": (lambda w: _export(w, "--overwrite", out=task_file(w.store(), "t0")), "not a safetensors"),
    "export_parent_missing": (lambda w: _export(w, out=w.root / "no" / "x.safetensors"), "no such directory"),
    "export_unknown_task": (lambda w: _export(w, task="nope"), "'nope'"),
    "export_finetuned_needs_pretrained": (lambda w: _export(w, "--finetuned-weights"), "--pretrained"),
    "export_other_pretrained": (lambda w: _export(w, "--pretrained", w.root / "ckpt" / "other.safetensors"), "not the weights"),
    "merge_other_pretrained": (lambda w: _merge(w, pre=w.root / "ckpt" / "other.safetensors"), "not the weights"),
    "quantize_add_existing_task": (lambda w: _quantize(w, fts=[f"t0={w.ft('t0')}"], out=w.store()), "already in store"),
    "quantize_add_other_pretrained": (lambda w: [Q, "--pretrained", w.root / "ckpt" / "other.safetensors", "--finetuned",
                                                 f"t9={w.ft('t0')}", "--out", w.store(), "--quiet"], "not the weights"),
    "quantize_add_other_settings": (lambda w: _quantize(w, "--bits", "2", fts=[f"t9={w.ft('t0')}"], out=w.store()), "differ"),
    "inspect_missing": (lambda w: ["inspect", w.root / "nowhere"], "nowhere"),
    "inspect_user_dir": (lambda w: ["inspect", _user_dir(w)], "not a store"),
    "demo_user_dir": (lambda w: ["demo", "--quick", "--out", _user_dir(w)], "not a demo output"),
    "demo_out_is_file": (lambda w: ["demo", "--quick", "--out", w.pre], "is a file"),
    "demo_store_dir": (lambda w: ["demo", "--quick", "--out", w.store()], "not a demo output"),
}


@pytest.mark.parametrize("case", list(OUTPUT_CASES))
def test_existing_outputs_and_paths(world, tvq, monkeypatch, case):
    monkeypatch.chdir(world.store("fp32"))  # `--out .` is a store (or a non-artifact directory) here
    argv_fn, fragment = OUTPUT_CASES[case]
    argv = argv_fn(world)
    before = tree_hash(world.root)
    line = assert_refused(tvq(*argv), fragment)
    if "overwrite" in case or "user" in case:
        assert "--overwrite" not in line or "existing" in case, line  # never suggests destroying it
    assert tree_hash(world.root) == before


def test_quantize_out_dot_overwrite(world, tvq, monkeypatch):
    """`--out . --overwrite` inside a store: refused, and no staged store is left behind."""
    monkeypatch.chdir(world.store())
    before = tree_hash(world.root)
    assert_refused(tvq(*_quantize(world, "--overwrite", out=".")), "current directory")
    assert tree_hash(world.root) == before


# ------------------------------------------------------------------ pickles


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("as_pretrained", [False, True])
def test_malicious_pickle_refused_without_opt_in(world, tvq, as_pretrained):
    marker = world.root / "PWNED"
    evil = world.root / "ckpt" / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"proj": _Evil(marker)}, f)
    argv = ([Q, "--pretrained", evil, "--finetuned", *world.ft_args(), "--out", world.root / "s", "--quiet"]
            if as_pretrained else _quantize(world, fts=[f"t0={evil}"]))
    before = tree_hash(world.root)
    assert_refused(tvq(*argv), "evil.pt")
    assert not marker.exists()
    assert tree_hash(world.root) == before


def test_pickled_module_needs_opt_in_then_works(world, tvq):
    from tvq_lightning.models.tiny import TinyEncoder
    from tvq_lightning.store.checkpoints import load_state_dict

    model = TinyEncoder(width=16, depth=1)
    model.load_state_dict({k: v for k, v in load_state_dict(world.ft("t0")).items() if k != "bn.num_batches_tracked"})
    path = world.root / "ckpt" / "module.pt"
    torch.save(model, path)
    fts = [f"t0={path}"]
    pre = world.root / "ckpt" / "pre_nobn.safetensors"
    from tvq_lightning.store.st_stream import save_safetensors

    save_safetensors({k: v for k, v in load_state_dict(world.pre).items() if k != "bn.num_batches_tracked"}, pre)
    argv = [Q, "--pretrained", pre, "--finetuned", *fts, "--out", world.root / "s", "--quiet"]
    assert_refused(tvq(*argv), "allow-pickle")
    assert tvq(*argv, "--allow-pickle").rc == 0
