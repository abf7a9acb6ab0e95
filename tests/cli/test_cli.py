"""The ``tvq`` command line: help, quantize / inspect / export end to end, adding tasks, and bad
input that must end in one ``tvq: error:`` line, exit status 2, and no files left behind."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tvq_lightning.quant.qtensor import QTensor
from tvq_lightning.store import StoreConfig, TaskVectorStore
from tvq_lightning.store.checkpoints import load_state_dict

VENV_TVQ = Path(sys.executable).with_name("tvq")


def assert_one_line_error(res, *needles: str) -> None:
    assert res.rc == 2, (res.rc, res.out, res.err)
    lines = res.err.splitlines()
    assert len(lines) == 1, res.err
    assert lines[0].startswith("tvq: error: "), res.err
    assert "Traceback" not in res.err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def quantize(tvq, ckpts, out, *extra, names=()):
    return tvq("quantize", "--pretrained", ckpts.pre, "--finetuned", *ckpts.finetuned_args(*names), "--out", out,
               "--quiet", *extra)


# --------------------------------------------------------------------------- help


QUANTIZE_FLAGS = ["--pretrained", "--finetuned", "--scheme", "--bits", "--base-bits", "--offset-bits", "--budget",
                  "--granularity", "--group-size", "--no-error-correction", "--out"]


def test_top_level_help(tvq):
    res = tvq("--help")
    assert res.rc == 0
    for cmd in ("quantize", "inspect", "export", "demo"):
        assert cmd in res.out


def test_quantize_help_documents_every_flag(tvq):
    res = tvq("quantize", "--help")
    assert res.rc == 0
    for flag in QUANTIZE_FLAGS + ["--prefix", "--allow-pickle", "--overwrite", "--rtvq-base", "--symmetric"]:
        assert re.search(re.escape(flag) + r"\b", res.out), flag
    for scheme in ("fp32", "fq", "tvq", "rtvq"):
        assert scheme in res.out


def test_export_and_inspect_help(tvq):
    res = tvq("export", "--help")
    assert res.rc == 0
    for flag in ("--finetuned-weights", "--store", "--task", "--pretrained", "--out", "--overwrite", "--prefix"):
        assert flag in res.out
    res = tvq("inspect", "--help")
    assert res.rc == 0 and "--json" in res.out


def test_no_command_is_a_usage_error(tvq):
    res = tvq()
    assert res.rc == 2 and "usage" in res.err


# --------------------------------------------------------------------------- end to end


def test_quantize_inspect_export_end_to_end(tmp_path, tvq, ckpts):
    out = tmp_path / "store"
    res = quantize(tvq, ckpts, out, "--scheme", "tvq", "--bits", "4")
    assert res.rc == 0, res.err
    assert "3 task(s)" in res.out and "TVQ-INT4" in res.out

    res = tvq("inspect", out)
    assert res.rc == 0, res.err
    assert "TVQ-INT4" in res.out and "t0, t1, t2" in res.out and "% of 3 fp32 checkpoints" in res.out

    res = tvq("inspect", out, "--json")
    assert res.rc == 0, res.err
    info = json.loads(res.out)
    assert info["tasks"] == ["t0", "t1", "t2"]
    assert info["scheme"] == "TVQ-INT4"
    store = TaskVectorStore(out)
    assert info["bytes_on_disk"] == store.nbytes()
    fp32 = 4 * sum(v.numel() for v in ckpts.pre_sd.values())
    assert info["ratio_to_fp32"] == pytest.approx(store.nbytes() / (3 * fp32))
    assert 4 / 32 < info["ratio_to_fp32"] < 0.5

    tv = tmp_path / "tau.safetensors"
    res = tvq("export", "--store", out, "--task", "t1", "--out", tv)
    assert res.rc == 0, res.err
    assert "task vector" in res.out and tv.is_file()
    got = load_state_dict(tv)
    assert set(got) == set(ckpts.pre_sd)
    for k, p in ckpts.pre_sd.items():
        tau = ckpts.ft_sds["t1"][k] - p
        expect = QTensor.quantize(tau, StoreConfig().spec(4)).dequantize() if p.dim() >= 2 else tau
        assert torch.equal(got[k], expect), k

    ft = tmp_path / "ft.safetensors"
    res = tvq("export", "--store", out, "--task", "t1", "--pretrained", ckpts.pre, "--finetuned-weights", "--out", ft)
    assert res.rc == 0, res.err
    assert "fine-tuned weights" in res.out
    rec = load_state_dict(ft)
    for k, p in ckpts.pre_sd.items():
        assert torch.equal(rec[k], p + got[k]), k
        assert (rec[k] - ckpts.ft_sds["t1"][k]).abs().max() < 1e-3


@pytest.mark.parametrize("opts,label", [
    (["--scheme", "fp32"], "FP32"),
    (["--scheme", "fq", "--bits", "8"], "FQ-INT8"),
    (["--scheme", "rtvq", "--base-bits", "3", "--offset-bits", "2"], "RTVQ-B3O2"),
    (["--scheme", "rtvq", "--no-error-correction"], "RTVQ-B3O2-noEC"),
    (["--scheme", "tvq", "--bits", "2", "--granularity", "group", "--group-size", "64", "--symmetric"], "TVQ-INT2"),
    (["--scheme", "tvq", "--budget", "3", "--per-tensor-bits"], "TVQ-budget3"),
])
def test_quantize_options_reach_the_store(tmp_path, tvq, ckpts, opts, label):
    out = tmp_path / "store"
    res = quantize(tvq, ckpts, out, *opts)
    assert res.rc == 0, res.err
    cfg = TaskVectorStore(out).config
    assert cfg.label == label
    if "--no-error-correction" in opts:
        assert cfg.error_correction is False
        assert "error correction: False" in tvq("inspect", out).out
    if "--granularity" in opts:
        assert (cfg.granularity, cfg.group_size, cfg.symmetric) == ("group", 64, True)
    info = json.loads(tvq("inspect", out, "--json").out)
    if "--budget" in opts:
        assert info["allocation"] is not None and info["bits_per_param"] <= 3 + 1e-9
    res = tvq("export", "--store", out, "--task", "t0", "--pretrained", ckpts.pre, "--out", tmp_path / "x.safetensors")
    assert res.rc == 0, res.err


def test_fq_export_needs_pretrained(tmp_path, tvq, ckpts, snap):
    out = tmp_path / "store"
    assert quantize(tvq, ckpts, out, "--scheme", "fq", "--bits", "8").rc == 0
    before = snap(tmp_path)
    res = tvq("export", "--store", out, "--task", "t0", "--out", tmp_path / "x.safetensors")
    assert_one_line_error(res, "--pretrained")
    res = tvq("export", "--store", out, "--task", "t0", "--finetuned-weights", "--out", tmp_path / "x.safetensors")
    assert_one_line_error(res, "--pretrained")
    assert snap(tmp_path) == before


def test_adding_tasks_with_a_second_quantize(tmp_path, tvq, ckpts):
    out = tmp_path / "store"
    assert quantize(tvq, ckpts, out, "--scheme", "tvq", "--bits", "3", names=("t0", "t1")).rc == 0
    old = {p: p.read_bytes() for p in (out / "tasks").iterdir()}
    res = quantize(tvq, ckpts, out, names=("t2",))
    assert res.rc == 0, res.err
    assert "added 1 task(s)" in res.out and "3 task(s)" in res.out
    # the store's own options may be repeated
    ckpts.fts["t3"] = ckpts.write("t3", ckpts.ft_sds["t0"])
    res = quantize(tvq, ckpts, out, "--scheme", "tvq", "--bits", "3", names=("t3",))
    assert res.rc == 0, res.err
    for p, data in old.items():
        assert p.read_bytes() == data
    store = TaskVectorStore(out)
    assert store.tasks == ["t0", "t1", "t2", "t3"] and store.config.bits == 3
    assert torch.equal(store.task_vector("t3", "conv1.weight"), store.task_vector("t0", "conv1.weight"))
    assert json.loads(tvq("inspect", out, "--json").out)["num_tasks"] == 4


@pytest.mark.parametrize("base", ["frozen", "recompute"])
def test_adding_tasks_to_rtvq(tmp_path, tvq, ckpts, base):
    out = tmp_path / "store"
    assert quantize(tvq, ckpts, out, "--scheme", "rtvq", names=("t0", "t1")).rc == 0
    res = quantize(tvq, ckpts, out, "--rtvq-base", base, names=("t2",))
    assert res.rc == 0, res.err
    store = TaskVectorStore(out)
    assert store.tasks == ["t0", "t1", "t2"]
    assert store.layout.generation == (2 if base == "recompute" else 1)
    assert len(list((out / "tasks").iterdir())) == 3


@pytest.mark.parametrize("opts", [["--scheme", "rtvq"], ["--bits", "2"], ["--granularity", "channel"],
                                  ["--no-error-correction"], ["--budget", "3"]])
def test_conflicting_options_when_adding(tmp_path, tvq, ckpts, snap, opts):
    out = tmp_path / "store"
    assert quantize(tvq, ckpts, out, "--scheme", "tvq", "--bits", "4", names=("t0",)).rc == 0
    before = snap(tmp_path)
    res = quantize(tvq, ckpts, out, *opts, names=("t1",))
    assert_one_line_error(res, str(out), "TVQ-INT4")
    assert snap(tmp_path) == before


# --------------------------------------------------------------------------- bad input


def _bad_case(tmp_path, ckpts, case):
    """(argv, substrings the error line must contain) for one bad-input case."""
    out = tmp_path / "store"
    pre, fts = str(ckpts.pre), ckpts.finetuned_args()
    if case == "missing_pretrained":
        return ["quantize", "--pretrained", ckpts.root / "nope.safetensors", "--finetuned", *fts, "--out", out], ["nope.safetensors"]
    if case == "missing_finetuned":
        return ["quantize", "--pretrained", pre, "--finetuned", *fts, f"t9={ckpts.root / 'gone.pt'}", "--out", out], ["gone.pt"]
    if case in ("missing_key", "extra_key", "shape"):
        sd = dict(ckpts.ft_sds["t1"])
        if case == "missing_key":
            del sd["ln_post.bias"]
            key = "ln_post.bias"
        elif case == "extra_key":
            sd["head.weight"] = torch.zeros(4, 32)
            key = "head.weight"
        else:
            sd["proj"] = torch.zeros(32, 16)
            key = "proj"
        path = ckpts.write("bad_ft", sd)
        return ["quantize", "--pretrained", pre, "--finetuned", f"bad={path}", "--out", out], ["bad_ft.safetensors", key]
    if case in ("nan", "inf"):
        sd = {k: v.clone() for k, v in ckpts.ft_sds["t2"].items()}
        key = "blocks.0.linear2.weight" if case == "nan" else "ln_post.weight"
        sd[key].view(-1)[0] = float("nan") if case == "nan" else float("inf")
        path = ckpts.write("diverged", sd)
        return ["quantize", "--pretrained", pre, "--finetuned", *fts, f"bad={path}", "--out", out], ["diverged.safetensors", key]
    if case == "duplicate":
        return ["quantize", "--pretrained", pre, "--finetuned", f"a={ckpts.fts['t0']}", f"a={ckpts.fts['t1']}", "--out", out], ["'a'", "twice"]
    if case == "no_equals":
        return ["quantize", "--pretrained", pre, "--finetuned", "cars", "--out", out], ["'cars'", "NAME=PATH"]
    if case == "empty_name":
        return ["quantize", "--pretrained", pre, "--finetuned", f"={ckpts.fts['t0']}", "--out", out], ["NAME=PATH"]
    if case == "bad_name":
        return ["quantize", "--pretrained", pre, "--finetuned", f"a b={ckpts.fts['t0']}", "--out", out], ["'a b'"]
    if case in ("bits0", "bits9", "base_bits9", "offset_bits0"):
        flag = {"bits0": ["--bits", "0"], "bits9": ["--bits", "9"], "base_bits9": ["--scheme", "rtvq", "--base-bits", "9"],
                "offset_bits0": ["--scheme", "rtvq", "--offset-bits", "0"]}[case]
        return ["quantize", "--pretrained", pre, "--finetuned", *fts, *flag, "--out", out], ["1..8"]
    if case == "group_size0":
        return ["quantize", "--pretrained", pre, "--finetuned", *fts, "--granularity", "group", "--group-size", "0", "--out", out], ["group_size"]
    if case == "budget":
        return ["quantize", "--pretrained", pre, "--finetuned", *fts, "--scheme", "rtvq", "--budget", "0.5", "--out", out], ["0.5", "--budget"]
    if case == "budget_fp32":
        return ["quantize", "--pretrained", pre, "--finetuned", *fts, "--scheme", "fp32", "--budget", "3", "--out", out], ["--budget"]
    if case == "pickle":
        from tvq_lightning.models import TinyEncoder

        model = TinyEncoder(width=32, depth=1)
        model.load_state_dict(ckpts.ft_sds["t0"])
        path = ckpts.root / "module.pt"
        torch.save(model, path)
        return ["quantize", "--pretrained", pre, "--finetuned", f"m={path}", "--out", out], ["module.pt", "--allow-pickle"]
    if case == "out_not_a_store":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
        return ["quantize", "--pretrained", pre, "--finetuned", *fts, "--out", out], [str(out)]
    if case == "wrong_prefix":
        return ["quantize", "--pretrained", pre, "--finetuned", *fts, "--prefix", "model.", "--out", out], ["model."]
    raise AssertionError(case)


BAD_CASES = ["missing_pretrained", "missing_finetuned", "missing_key", "extra_key", "shape", "nan", "inf", "duplicate",
             "no_equals", "empty_name", "bad_name", "bits0", "bits9", "base_bits9", "offset_bits0", "group_size0", "budget",
             "budget_fp32", "pickle", "out_not_a_store", "wrong_prefix"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_one_line_exit_2_nothing_left(tmp_path, tvq, ckpts, snap, case):
    argv, needles = _bad_case(tmp_path, ckpts, case)
    before = snap(tmp_path)
    res = tvq(*argv, "--quiet")
    assert_one_line_error(res, *needles)
    assert res.out == ""
    assert snap(tmp_path) == before


def test_bad_input_when_adding_leaves_store_unchanged(tmp_path, tvq, ckpts, snap):
    out = tmp_path / "store"
    assert quantize(tvq, ckpts, out, names=("t0", "t1")).rc == 0
    sd = {k: v.clone() for k, v in ckpts.ft_sds["t2"].items()}
    sd["ln_post.bias"][0] = float("nan")
    bad = ckpts.write("nan_ft", sd)
    before = snap(tmp_path)
    res = tvq("quantize", "--pretrained", ckpts.pre, "--finetuned", f"t2={bad}", "--out", out, "--quiet")
    assert_one_line_error(res, "nan_ft.safetensors", "ln_post.bias")
    res = quantize(tvq, ckpts, out, names=("t0",))
    assert_one_line_error(res, "'t0'", "already in store")
    assert snap(tmp_path) == before


def test_fingerprint_mismatch_when_adding_and_exporting(tmp_path, tvq, ckpts, snap):
    from tvq_lightning.data.synthetic import synthetic_finetunes
    from tvq_lightning.models.tiny import tiny_pretrained
    from tvq_lightning.store.st_stream import save_safetensors

    out = tmp_path / "store"
    assert quantize(tvq, ckpts, out, names=("t0",)).rc == 0
    other = {k: v.detach().clone() for k, v in tiny_pretrained(5, width=32, depth=1).state_dict().items()}
    other_pre = save_safetensors(other, ckpts.root / "other_pre.safetensors")
    other_ft = save_safetensors(synthetic_finetunes(other, 1, seed=9)[0], ckpts.root / "other_ft.safetensors")
    before = snap(tmp_path)
    res = tvq("quantize", "--pretrained", other_pre, "--finetuned", f"x={other_ft}", "--out", out, "--quiet")
    assert_one_line_error(res, "other_pre.safetensors", str(out))
    res = tvq("export", "--store", out, "--task", "t0", "--pretrained", other_pre, "--finetuned-weights",
              "--out", tmp_path / "x.safetensors")
    assert_one_line_error(res, "other_pre.safetensors", str(out))
    assert snap(tmp_path) == before


def test_damaged_store(tmp_path, tvq, ckpts):
    out = tmp_path / "store"
    assert quantize(tvq, ckpts, out).rc == 0
    task_file = out / TaskVectorStore(out).layout.tasks["t1"].file
    data = task_file.read_bytes()
    task_file.write_bytes(data[: len(data) // 2])
    res = tvq("export", "--store", out, "--task", "t1", "--out", tmp_path / "x.safetensors")
    assert_one_line_error(res, task_file.name)
    assert not (tmp_path / "x.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    res = tvq("export", "--store", out, "--task", "t0", "--out", tmp_path / "y.safetensors")
    assert res.rc == 0, res.err

    (out / "layout.json").write_text("{not json")
    for argv in (["inspect", out], ["inspect", out, "--json"],
                 ["export", "--store", out, "--task", "t0", "--out", tmp_path / "z.safetensors"]):
        assert_one_line_error(tvq(*argv), "layout.json")
    assert_one_line_error(tvq("inspect", tmp_path / "nowhere"), "nowhere")
    assert_one_line_error(tvq("inspect", ckpts.root), str(ckpts.root))


def test_interrupt_leaves_nothing_behind(tmp_path, tvq, ckpts, snap, monkeypatch):
    from tvq_lightning.store import writer

    out = tmp_path / "store"
    assert quantize(tvq, ckpts, out, names=("t0",)).rc == 0
    before = snap(tmp_path)
    orig, calls = writer.encode_single, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return orig(*a, **kw)

    monkeypatch.setattr(writer, "encode_single", interrupted)
    for argv in (["--out", tmp_path / "new"], ["--out", out], ["--out", out, "--overwrite"]):
        calls.clear()
        res = tvq("quantize", "--pretrained", ckpts.pre, "--finetuned", *ckpts.finetuned_args("t1", "t2"), "--quiet", *argv)
        assert res.rc == 130 and len(res.err.splitlines()) == 1 and "interrupted" in res.err
        assert snap(tmp_path) == before


def test_quantize_overwrite_replaces_store(tmp_path, tvq, ckpts):
    out = tmp_path / "store"
    assert quantize(tvq, ckpts, out, "--bits", "2", names=("t0",)).rc == 0
    res = quantize(tvq, ckpts, out, "--bits", "8", "--overwrite")
    assert res.rc == 0, res.err
    store = TaskVectorStore(out)
    assert store.config.bits == 8 and store.tasks == ["t0", "t1", "t2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "store"]


def test_pickle_allowed_with_flag(tmp_path, tvq, ckpts):
    argv, _ = _bad_case(tmp_path, ckpts, "pickle")
    res = tvq(*argv, "--allow-pickle", "--quiet")
    assert res.rc == 0, res.err
    assert TaskVectorStore(tmp_path / "store").tasks == ["m"]


# --------------------------------------------------------------------------- Lightning .ckpt


def test_lightning_ckpt_with_prefix(tmp_path, tvq, ckpts):
    def save_ckpt(sd, path):
        torch.save({"epoch": 3, "global_step": 100, "state_dict": {**{"model." + k: v for k, v in sd.items()},
                                                                   "criterion.weight": torch.ones(3)},
                    "hyper_parameters": {"lr": 1e-3}}, path)
        return path

    pre = save_ckpt(ckpts.pre_sd, tmp_path / "pre.ckpt")
    fts = {n: save_ckpt(sd, tmp_path / f"{n}.ckpt") for n, sd in ckpts.ft_sds.items()}
    out = tmp_path / "store"
    res = tvq("quantize", "--pretrained", pre, "--finetuned", *[f"{n}={p}" for n, p in fts.items()],
              "--prefix", "model.", "--scheme", "rtvq", "--out", out, "--quiet")
    assert res.rc == 0, res.err
    store = TaskVectorStore(out)
    assert set(store.keys) == set(ckpts.pre_sd)
    # same task vectors as from the equivalent safetensors files
    out2 = tmp_path / "store2"
    assert quantize(tvq, ckpts, out2, "--scheme", "rtvq").rc == 0
    ref = TaskVectorStore(out2)
    for k in store.keys:
        for t in store.tasks:
            assert torch.equal(store.task_vector(t, k), ref.task_vector(t, k))
    assert store.fingerprint == ref.fingerprint

    res = tvq("export", "--store", out, "--task", "t0", "--pretrained", pre, "--prefix", "model.",
              "--finetuned-weights", "--out", tmp_path / "t0.safetensors")
    assert res.rc == 0, res.err
    assert set(load_state_dict(tmp_path / "t0.safetensors")) == set(ckpts.pre_sd)

    # without the prefix the keys do not match the store's
    res = tvq("quantize", "--pretrained", pre, "--finetuned", f"t9={fts['t0']}", "--out", out, "--quiet")
    assert_one_line_error(res)


# --------------------------------------------------------------------------- the console script


def test_console_script_entry_point(tmp_path, ckpts):
    """The installed ``tvq`` script runs a real quantize (stdout, exit 0, a readable store)."""
    exe = [str(VENV_TVQ)] if VENV_TVQ.exists() else [sys.executable, "-m", "tvq_lightning"]
    out = tmp_path / "s"
    res = subprocess.run([*exe, "quantize", "--pretrained", str(ckpts.pre), "--finetuned", *ckpts.finetuned_args(),
                          "--scheme", "rtvq", "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "stored 3 task(s) as RTVQ-B3O2" in res.stdout
    store = TaskVectorStore(out)
    assert store.tasks == ["t0", "t1", "t2"] and store.config.scheme == "rtvq"


def test_python_dash_m_error_is_one_line(tmp_path, ckpts):
    """``python -m tvq_lightning``: a usage mistake is one ``tvq: error:`` line, status 2, no traceback."""
    res = subprocess.run([sys.executable, "-m", "tvq_lightning", "quantize", "--pretrained", str(ckpts.pre),
                          "--finetuned", "cars", "--out", str(tmp_path / "s")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [res.stderr.strip()] and res.stderr.startswith("tvq: error: ")
    assert "'cars'" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "s").exists()

