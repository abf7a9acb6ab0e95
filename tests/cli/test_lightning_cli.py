"""``tvq fit|validate|test|predict``: every config in configs/ runs, in order, through ``main``;
``--print_config`` round-trips; the data -> model ``tasks`` link; TvqError as one line."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from tvq_lightning.cli.lightning import TvqLightningCLI
from tvq_lightning.cli.main import main
from tvq_lightning.store import TaskVectorStore

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
NAMES = ["finetune_tiny", "evaluate_tiny", "adamerging_task", "adamerging_layer", "tinting_tiny", "surgery_tiny",
         "pretrain_tiny_clip"]
# the NYUv2 recipes (GPU-sized; run shrunk on a stand-in dataset in tests/cli/test_nyuv2_configs.py)
DENSE_NAMES = ["nyuv2_finetune", "nyuv2_evaluate", "nyuv2_adamerging"]
# (config, extra args) in the order configs/README.md gives; max_steps kept small
PIPELINE = [
    ("finetune_tiny", ["--trainer.max_steps", "20"]),
    ("finetune_tiny", ["--trainer.max_steps", "20", "--model.task", "b", "--data.train_task", "b"]),
    ("evaluate_tiny", ["-c", str(ROOT / "callbacks" / "report.yaml")]),
    ("adamerging_task", ["--trainer.max_steps", "3"]),
    ("adamerging_layer", ["--trainer.max_steps", "3"]),
    ("tinting_tiny", ["--trainer.max_steps", "4"]),
    ("surgery_tiny", ["--trainer.max_steps", "3"]),
]

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")


def command(name: str) -> str:
    """The sub-command named on the config's first line (``# tvq <cmd> -c configs/<name>.yaml``)."""
    return Path(CONFIGS / f"{name}.yaml").read_text().splitlines()[0].split()[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory for the module (the configs write under ./runs/tiny)."""
    d = tmp_path_factory.mktemp("lightning-cli")
    old = os.getcwd()
    os.chdir(d)
    yield d
    os.chdir(old)


@pytest.fixture(scope="module")
def pipeline(workdir):
    codes = []
    for name, extra in PIPELINE:
        codes.append((name, main([command(name), "-c", str(CONFIGS / f"{name}.yaml"), *extra])))
    return codes


def test_config_files_name_their_command():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(NAMES + DENSE_NAMES)
    for name in NAMES + DENSE_NAMES:
        first = (CONFIGS / f"{name}.yaml").read_text().splitlines()[0]
        assert first.startswith(f"# tvq {command(name)} -c configs/{name}.yaml"), first
        assert command(name) in ("fit", "test")


def test_pretrain_recipe_runs_and_exports_a_loadable_clip(tmp_path, monkeypatch):
    """The recipe of the shipped θ0, shrunk: it trains, and its export loads with load_tiny_clip."""
    from tvq_lightning.models.tiny_clip import load_tiny_clip

    monkeypatch.setenv("TVQ_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "clip"
    rc = main(["fit", "-c", str(CONFIGS / "pretrain_tiny_clip.yaml"), "--trainer.max_steps", "2",
               "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
               "--data.init_args.num_samples", "64", "--data.init_args.batch_size", "16",
               "--model.init_args.export_dir", str(out)])
    assert rc == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["recipe"]["steps"] == 2 and meta["recipe"]["num_samples"] == 64
    clip = load_tiny_clip(out)
    shipped = json.loads((ROOT / "tvq_lightning" / "assets" / "tiny_clip" / "config.json").read_text())
    assert clip.config == shipped["model"]          # the recipe builds the shipped architecture


def test_every_config_runs_in_order(pipeline, workdir):
    assert [rc for _, rc in pipeline] == [0] * len(PIPELINE), pipeline
    tiny = workdir / "runs" / "tiny"
    assert TaskVectorStore(tiny / "store").tasks == ["a", "b"]
    assert (tiny / "pretrained.safetensors").is_file()
    assert sorted(p.name for p in (tiny / "heads").iterdir()) == ["a.safetensors", "b.safetensors"]
    for d in ("adamerging_task", "adamerging_layer", "tinting"):
        assert (tiny / d / "coefficients.safetensors").is_file()
    assert sorted(p.name for p in (tiny / "tinting" / "heads").iterdir()) == ["a.safetensors", "b.safetensors"]
    for d in ("evaluate", "adamerging_task", "adamerging_layer", "tinting", "surgery"):
        (log_dir,) = (tiny / d / "lightning_logs").iterdir()
        report = json.loads((log_dir / "report.json").read_text())
        assert report["tasks"] == ["a", "b"] and set(report["values"]["acc"]) == {"a", "b", "avg"}
        assert (log_dir / "report.md").is_file() and (log_dir / "report.png").is_file()
        assert (log_dir / "config.yaml").is_file()            # LightningCLI saved the resolved config


@pytest.mark.parametrize("name", NAMES + DENSE_NAMES)
def test_print_config_round_trips(name, workdir, tvq):
    first = tvq(command(name), "-c", CONFIGS / f"{name}.yaml", "--print_config")
    assert first.rc == 0, first.err
    printed = workdir / f"printed-{name}.yaml"
    printed.write_text(first.out)
    again = tvq(command(name), "-c", printed, "--print_config")
    assert again.rc == 0, again.err
    assert again.out == first.out
    cfg = yaml.safe_load(first.out)
    if name == "pretrain_tiny_clip":                          # image-caption pairs: no task list
        assert cfg["data"]["class_path"].endswith("CaptionPairs")
        return
    if name in DENSE_NAMES:
        assert cfg["data"]["class_path"].endswith("NYUv2")
        assert cfg["data"]["init_args"]["tasks"] == ["segmentation", "depth", "normal"]
        return
    assert cfg["data"]["init_args"]["tasks"] == ["a", "b"]
    assert "tasks" not in cfg["model"]["init_args"]            # a link target: given once, on the data


def test_printed_configs_rerun(pipeline, workdir, tvq):
    for name, extra in (("evaluate_tiny", []), ("tinting_tiny", ["--trainer.max_steps", "2"])):
        printed = workdir / f"rerun-{name}.yaml"
        printed.write_text(tvq(command(name), "-c", CONFIGS / f"{name}.yaml", "--print_config").out)
        res = tvq(command(name), "-c", printed, *extra)
        assert res.rc == 0, res.err


def test_tasks_link(pipeline, workdir):
    cli = TvqLightningCLI(args=["-c", str(CONFIGS / "evaluate_tiny.yaml"), "--data.init_args.tasks", "[b]"], run=False)
    assert cli.model.tasks == ["b"] and cli.datamodule.tasks == ["b"]
    # a module without a `tasks` argument (single-task fine-tuning) is not linked
    cli = TvqLightningCLI(args=["-c", str(CONFIGS / "finetune_tiny.yaml")], run=False)
    assert cli.model.task == "a" and not hasattr(cli.model, "tasks")


# every shipped config runs `tvq predict` (after the pipeline wrote its store, heads and coefficients)
PREDICT = [("finetune_tiny", ["--model.head_path", "runs/tiny/heads/a.safetensors"]), ("evaluate_tiny", []),
           ("adamerging_task", []), ("adamerging_layer", []), ("tinting_tiny", []), ("surgery_tiny", []),
           ("pretrain_tiny_clip", ["--data.init_args.num_samples", "32", "--data.init_args.batch_size", "16",
                                   "--trainer.accelerator", "cpu"])]


@pytest.mark.parametrize("name,extra", PREDICT, ids=[n for n, _ in PREDICT])
def test_predict_runs_for_every_config(pipeline, workdir, tvq, name, extra, monkeypatch):
    monkeypatch.setenv("TVQ_CACHE_DIR", str(workdir / "cache"))
    res = tvq("predict", "-c", CONFIGS / f"{name}.yaml", *extra)
    assert res.rc == 0, res.err[-3000:]


def test_predict_gives_the_merged_model_s_labels(pipeline, workdir):
    """``predict`` of the evaluation config: per task loader, ``{"task", "preds"}`` batches whose
    labels score exactly the accuracy ``test`` logs."""
    cli = TvqLightningCLI(args=["-c", str(CONFIGS / "evaluate_tiny.yaml"), "--trainer.logger", "false",
                                "--trainer.callbacks", "[]"], run=False)
    preds = cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    assert len(preds) == 2
    for task, batches in zip(["a", "b"], preds):
        assert {b["task"] for b in batches} == {task}
        labels = cli.datamodule.split(task, "test").tensors[1]
        got = torch.cat([b["preds"] for b in batches])
        assert got.shape == labels.shape and got.dtype == torch.long
        assert float((got == labels).float().mean()) == pytest.approx(cli.model.results[task])


def test_tvq_error_is_one_line(workdir, tvq):
    res = tvq("test", "-c", CONFIGS / "evaluate_tiny.yaml", "--model.init_args.store", "no-such-store")
    assert res.rc == 2
    lines = [ln for ln in res.err.splitlines() if ln.startswith("tvq: error:")]
    assert len(lines) == 1 and "no-such-store" in lines[0], res.err
    assert "Traceback" not in res.err


def test_help_lists_lightning_commands(tvq):
    res = tvq("--help")
    assert res.rc == 0
    for cmd in ("fit", "validate", "test", "predict", "quantize"):
        assert f"    {cmd} " in res.out
    res = tvq("fit", "--help")
    assert res.rc == 0 and "usage: tvq" in res.out and "--test_after_fit" in res.out
