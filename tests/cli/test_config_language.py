"""One config language: ``tvq quantize``/``merge``/``demo`` options generated from the dataclasses they
build (jsonargparse), ``-c FILE`` and ``--print_config`` round trips, one-line errors everywhere
(LightningCLI's included), ``--device`` checks and a closed stdout pipe."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tvq_lightning.cli import demo as demo_cli
from tvq_lightning.cli.options import parse_two_pass
from tvq_lightning.demo.config import DemoConfig
from tvq_lightning.merging.registry import get_merger_class, list_mergers
from tvq_lightning.store import StoreConfig, TaskVectorStore

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def one_error_line(res) -> str:
    assert res.rc == 2, (res.rc, res.out, res.err)
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tvq: error: "), res.err
    return lines[0]


def store_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def wide_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per option in --help


# --------------------------------------------------------------------------- generated from the dataclasses


def _help_line(help_text: str, option: str) -> str:
    """An option's entry in --help, its continuation lines joined."""
    lines = help_text.splitlines()
    start = next((i for i, ln in enumerate(lines) if re.match(rf"\s+{re.escape(option)}\b", ln)), None)
    assert start is not None, f"{option} not in help:\n{help_text}"
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"\s+-|\S|$", lines[i])), len(lines))
    return " ".join(ln.strip() for ln in lines[start:end])


def test_quantize_help_shows_every_storeconfig_field_with_type_and_default(tvq, wide_help):
    res = tvq("quantize", "--help")
    assert res.rc == 0
    for f in dataclasses.fields(StoreConfig):
        default = "null" if f.default is None else f.default
        line = _help_line(res.out, f"--{f.name}")
        assert re.search(rf"\(type: .*, default: {re.escape(str(default))}\)", line), line
        if "_" in f.name:
            assert f"--{f.name.replace('_', '-')}" in line, line


@pytest.mark.parametrize("method", list_mergers())
def test_merge_help_shows_the_methods_config(method, tvq, wide_help):
    res = tvq("merge", "--method", method, "--help")
    assert res.rc == 0, res.err
    for f in dataclasses.fields(get_merger_class(method).Config):
        line = _help_line(res.out, f"--{f.name}")
        assert f"default: {'null' if f.default is None else f.default}" in line, line


def test_demo_options_are_democonfig_fields_quick_changes_the_defaults():
    ns = parse_two_pass(["--finetune_steps", "7", "--tasks", "shapes", "digits"], demo_cli.build_parser)
    assert dataclasses.replace(DemoConfig(), finetune_steps=7, tasks=("shapes", "digits")) == \
        _demo_config(ns)
    ns = parse_two_pass(["--quick", "--set", "finetune_lr=1e-4", "--seed", "3"], demo_cli.build_parser)
    assert _demo_config(ns) == dataclasses.replace(DemoConfig.quick(), finetune_lr=1e-4, seed=3)
    assert ns.progress is True and parse_two_pass(["--no-progress"], demo_cli.build_parser).progress is False


def _demo_config(ns) -> DemoConfig:
    from tvq_lightning.cli.options import build_dataclass

    return build_dataclass(DemoConfig, ns).with_overrides(ns.set)


# --------------------------------------------------------------------------- --print_config round trips


def test_quantize_print_config_reruns_as_is(tmp_path, tvq, ckpts):
    flags = ["--pretrained", ckpts.pre, "--finetuned", *ckpts.finetuned_args(), "--scheme", "rtvq",
             "--base-bits", "4", "--no-error-correction", "--quiet"]
    assert tvq("quantize", *flags, "--out", tmp_path / "direct").rc == 0
    printed = tvq("quantize", *flags, "--out", tmp_path / "from_yaml", "--print_config")
    assert printed.rc == 0, printed.err
    assert not (tmp_path / "from_yaml").exists()
    cfg = yaml.safe_load(printed.out)
    assert (cfg["scheme"], cfg["base_bits"], cfg["error_correction"]) == ("rtvq", 4, False)
    (tmp_path / "store.yaml").write_text(printed.out)
    res = tvq("quantize", "-c", tmp_path / "store.yaml")
    assert res.rc == 0, res.err
    assert store_files(tmp_path / "from_yaml") == store_files(tmp_path / "direct")
    # printed again from the file: the same text
    assert tvq("quantize", "-c", tmp_path / "store.yaml", "--print_config").out == printed.out


def test_print_config_of_an_addition_shows_the_stores_settings(tmp_path, tvq, ckpts):
    out = tmp_path / "store"
    assert tvq("quantize", "--pretrained", ckpts.pre, "--finetuned", *ckpts.finetuned_args("t0"), "--scheme", "tvq",
               "--bits", "3", "--out", out, "--quiet").rc == 0
    printed = tvq("quantize", "--pretrained", ckpts.pre, "--finetuned", *ckpts.finetuned_args("t1"), "--out", out,
                  "--quiet", "--print_config")
    assert yaml.safe_load(printed.out)["bits"] == 3
    (tmp_path / "add.yaml").write_text(printed.out)
    assert tvq("quantize", "-c", tmp_path / "add.yaml").rc == 0
    assert TaskVectorStore(out).tasks == ["t0", "t1"]


@pytest.mark.parametrize("method,opts", [("ties", ["--k", "0.1", "--merge", "dis-mean"]),
                                         ("tall", ["--lambdas", "0.2", "0.4", "0.6"]),
                                         ("consensus", ["--lambdas", "[0.3,0.5,0.7]", "--k", "1"])])
def test_merge_print_config_reruns_as_is(method, opts, tmp_path, tvq, ckpts):
    store = tmp_path / "store"
    assert tvq("quantize", "--pretrained", ckpts.pre, "--finetuned", *ckpts.finetuned_args(), "--out", store,
               "--quiet").rc == 0
    per_task = get_merger_class(method).per_task
    direct, again = (tmp_path / n if per_task else tmp_path / f"{n}.safetensors" for n in ("direct", "again"))
    base = ["merge", "--pretrained", ckpts.pre, "--store", store, "--method", method, *opts, "--quiet"]
    res = tvq(*base, "--out", direct)
    assert res.rc == 0, res.err
    printed = tvq(*base, "--out", again, "--print_config")
    assert printed.rc == 0, printed.err
    (tmp_path / "merge.yaml").write_text(printed.out)
    assert tvq("merge", "-c", tmp_path / "merge.yaml").rc == 0
    read = store_files if per_task else (lambda p: p.read_bytes())
    assert read(again) == read(direct)


def test_demo_print_config_reruns_as_is(tvq, tmp_path):
    printed = tvq("demo", "--quick", "--finetune_steps", "5", "--set", "tasks=shapes,digits", "--print_config")
    assert printed.rc == 0, printed.err
    (tmp_path / "demo.yaml").write_text(printed.out)
    ns = parse_two_pass(["-c", str(tmp_path / "demo.yaml")], demo_cli.build_parser)
    assert _demo_config(ns) == dataclasses.replace(DemoConfig.quick(), finetune_steps=5, tasks=("shapes", "digits"))


# --------------------------------------------------------------------------- one-line errors


def _quantize_args(ckpts, tmp_path):
    return ["quantize", "--pretrained", ckpts.pre, "--finetuned", *ckpts.finetuned_args(), "--out", tmp_path / "s"]


@pytest.mark.parametrize("extra,needles", [
    (["--bitz", "3"], ["--bitz", "did you mean --bits"]),
    (["--bits", "four"], ["--bits expects int", "'four'"]),
    (["--scheme", "tvq8"], ["--scheme 'tvq8'", "fp32, fq, tvq, rtvq"]),
    (["--granularity", "row"], ["--granularity", "tensor, channel, group"]),
    (["--budget", "lots"], ["--budget", "float"]),
    (["-c", "missing.yaml"], ["-c/--config", "missing.yaml"]),
])
def test_quantize_errors_are_one_line(extra, needles, tmp_path, tvq, ckpts, snap):
    before = snap(tmp_path)
    line = one_error_line(tvq(*_quantize_args(ckpts, tmp_path), *extra))
    for n in needles:
        assert n in line, line
    assert snap(tmp_path) == before


def test_unknown_key_in_a_config_file_is_one_line(tmp_path, tvq, ckpts):
    (tmp_path / "c.yaml").write_text("bitz: 3\n")
    line = one_error_line(tvq(*_quantize_args(ckpts, tmp_path), "-c", tmp_path / "c.yaml"))
    assert "'bitz'" in line and "did you mean bits" in line
    (tmp_path / "c.yaml").write_text("bits: [3\n")
    one_error_line(tvq(*_quantize_args(ckpts, tmp_path), "-c", tmp_path / "c.yaml"))
    assert "--out" in one_error_line(tvq("quantize", "--pretrained", ckpts.pre, "--finetuned", "a=b"))


def test_demo_errors_are_one_line(tvq):
    assert "--finetune-steps expects int" in one_error_line(tvq("demo", "--finetune_steps", "many"))
    assert "not a valid int" in one_error_line(tvq("demo", "--set", "finetune_steps=1.5"))
    assert "did you mean finetune_steps" in one_error_line(tvq("demo", "--set", "finetune_step=3"))
    assert "budget_sensitivity" in one_error_line(tvq("demo", "--budget_sensitivity", "fisher"))


@pytest.fixture
def merge_base(ckpts, tvq, tmp_path):
    store = tmp_path / "store"
    assert tvq("quantize", "--pretrained", ckpts.pre, "--finetuned", *ckpts.finetuned_args(), "--out", store,
               "--quiet").rc == 0
    return ["merge", "--pretrained", ckpts.pre, "--store", store, "--out", tmp_path / "m.safetensors", "--quiet"]


def test_merge_errors_are_one_line(merge_base, tvq, tmp_path):
    line = one_error_line(tvq(*merge_base, "--method", "ties", "--zork", "1"))
    assert "method 'ties' has no option --zork" in line and "--scaling, --k, --merge" in line
    assert "--method required" in one_error_line(tvq(*merge_base))
    assert "--k expects int: 'abc'" in one_error_line(tvq(*merge_base, "--method", "consensus", "--k", "abc"))
    assert "'tall'" in one_error_line(tvq(*merge_base, "--method", "tall", "--lambdas", "x", "y"))
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("device,cuda,count,needles", [
    ("foo", False, 0, ["--device 'foo'", "cpu, cuda or cuda:N"]),
    ("cuda", False, 0, ["--device cuda", "CUDA is not available", "--device cpu"]),
    ("cuda:3", True, 1, ["--device cuda:3", "1 CUDA device", "cuda:0"]),
    ("meta", False, 0, ["--device meta", "cpu or cuda"]),
])
def test_merge_device_errors_name_the_option_and_the_fix(device, cuda, count, needles, merge_base, tvq, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    line = one_error_line(tvq(*merge_base, "--method", "ties", "--device", device))
    for n in needles:
        assert n in line, line


# --------------------------------------------------------------------------- LightningCLI config errors


@pytest.mark.parametrize("case,needles", [
    ("missing_file", ["-c/--config", "nope.yaml"]),
    ("typo_key", ["'trainer.max_stepz'", "did you mean trainer.max_steps"]),
    ("typo_option", ["--trainer.max_stepz", "did you mean --trainer.max_steps"]),
    ("bad_type", ["--trainer.max_steps expects int", "'abc'"]),
    ("nested_typo", ["'model.init_args.lrr'", "did you mean model.init_args.lr"]),
    ("nested_bad_type", ["--model.init_args.lr expects float"]),
])
def test_lightning_config_errors_are_one_line(case, needles, tvq, tmp_path):
    cfg = CONFIGS / "finetune_tiny.yaml"
    text = cfg.read_text()
    argv = {"missing_file": ["-c", tmp_path / "nope.yaml"],
            "typo_key": ["-c", tmp_path / "c.yaml"], "nested_typo": ["-c", tmp_path / "c.yaml"],
            "typo_option": ["-c", cfg, "--trainer.max_stepz", "3"],
            "bad_type": ["-c", cfg, "--trainer.max_steps", "abc"],
            "nested_bad_type": ["-c", cfg, "--model.init_args.lr", "abc"]}[case]
    if case == "typo_key":
        (tmp_path / "c.yaml").write_text(text.replace("max_steps:", "max_stepz:"))
    if case == "nested_typo":
        (tmp_path / "c.yaml").write_text(re.sub(r"\blr:", "lrr:", text))
    line = one_error_line(tvq("fit", *argv))
    for n in needles:
        assert n in line, line


# --------------------------------------------------------------------------- a closed stdout


def test_inspect_into_a_closed_pipe_exits_quietly(tmp_path, ckpts, tvq):
    store = tmp_path / "store"
    assert tvq("quantize", "--pretrained", ckpts.pre, "--finetuned", *ckpts.finetuned_args(), "--out", store,
               "--quiet").rc == 0
    read, write = os.pipe()
    os.close(read)  # the reader is gone before tvq writes (as with `| head -1` once head has exited)
    try:
        res = subprocess.run([sys.executable, "-m", "tvq_lightning", "inspect", str(store)], stdout=write,
                             stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert res.stderr == "" and res.returncode == 141, res.stderr


def test_broken_pipe_in_process(tmp_path, ckpts, tvq, monkeypatch):
    from tvq_lightning.cli.main import main

    store = tmp_path / "store"
    assert tvq("quantize", "--pretrained", ckpts.pre, "--finetuned", *ckpts.finetuned_args(), "--out", store,
               "--quiet").rc == 0

    class ClosedPipe:
        def write(self, _):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["inspect", str(store)]) == 141
