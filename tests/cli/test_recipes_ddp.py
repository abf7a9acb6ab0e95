"""Every shipped recipe in configs/ under real 2-process DDP on the CPU, through the ``tvq`` console
script (``--trainer.strategy ddp --trainer.devices 2 --trainer.accelerator cpu``: Lightning re-launches
the script for rank 1), shrunk to a couple of steps; each must exit 0. The test recipes write
their report from rank 0 (``MultiTaskReport`` resolves ``trainer.log_dir``, a collective, on
every rank)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
TVQ = Path(sys.executable).with_name("tvq")
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
STEPS = ["--trainer.max_steps", "2"]
# (run name, config, extra args), in the order configs/README.md gives
RECIPES = [
    ("finetune_a", "finetune_tiny", STEPS),
    ("finetune_b", "finetune_tiny", [*STEPS, "--model.task", "b", "--data.train_task", "b"]),
    ("evaluate", "evaluate_tiny", []),
    ("adamerging_task", "adamerging_task", STEPS),
    ("adamerging_layer", "adamerging_layer", STEPS),
    ("tinting", "tinting_tiny", STEPS),
    ("surgery", "surgery_tiny", STEPS),
    ("pretrain", "pretrain_tiny_clip", [*STEPS, "--data.init_args.num_samples", "64", "--data.init_args.batch_size", "16",
                                        "--model.init_args.export_dir", "runs/pretrain/tiny_clip",
                                        "--trainer.enable_model_summary", "false"]),
]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not TVQ.is_file(), reason="the tvq console script is not installed")]


def _command(config: str) -> str:
    return (CONFIGS / f"{config}.yaml").read_text().splitlines()[0].split()[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run the recipes in order in one working directory; ``{name: CompletedProcess}``."""
    work = tmp_path_factory.mktemp("recipes-ddp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TVQ_CACHE_DIR": str(work / "cache"), "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)
    out = {}
    for name, config, extra in RECIPES:
        cmd = [str(TVQ), _command(config), "-c", str(CONFIGS / f"{config}.yaml"), *DDP, *extra]
        out[name] = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=240)
    return work, out


@pytest.mark.parametrize("name", [r[0] for r in RECIPES])
def test_recipe_exits_0_under_ddp(runs, name):
    _, out = runs
    proc = out[name]
    assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{proc.stderr[-4000:]}"


def test_reports_written_once_by_rank_zero(runs):
    work, out = runs
    tiny = work / "runs" / "tiny"
    for d in ("evaluate", "adamerging_task", "adamerging_layer", "tinting", "surgery"):
        if out[d].returncode != 0:
            pytest.fail(f"{d} failed")
        reports = list((tiny / d).rglob("report.json"))
        assert len(reports) == 1, reports
        report = json.loads(reports[0].read_text())
        assert report["tasks"] == ["a", "b"] and set(report["values"]["acc"]) == {"a", "b", "avg"}
    assert (work / "runs" / "pretrain" / "tiny_clip" / "config.json").is_file()


# the NYUv2 recipes on a tiny stand-in dataset in the real layout, with a tiny smp encoder
DENSE_TINY = ["--trainer.enable_progress_bar", "false", "--data.num_workers", "0",
              "--model.encoder.init_args.name", "tu-resnet10t", "--model.encoder.init_args.output_stride", "32"]
DENSE_HEAD = ["--model.head.init_args.encoder_channels", "[3, 64, 64, 128, 256, 512]",
              "--model.head.init_args.decoder_channels", "8", "--model.encoder.init_args.weights", "null",
              "--model.warmup_steps", "0", "--data.batch_size", "2", *STEPS]
DENSE_RECIPES = [
    *((f"nyuv2_finetune_{task}", "nyuv2_finetune",
       [*DENSE_HEAD, "--model.task", task, "--model.task_type", task, "--data.train_task", task,
        "--model.head.init_args.out_channels", str(out)]) for task, out in (("segmentation", 13), ("depth", 1), ("normal", 3))),
    ("nyuv2_evaluate", "nyuv2_evaluate", ["--data.batch_size", "2"]),
    ("nyuv2_adamerging", "nyuv2_adamerging", ["--data.batch_size", "2", *STEPS]),
]


@pytest.fixture(scope="module")
def dense_runs(tmp_path_factory):
    pytest.importorskip("segmentation_models_pytorch")
    from tvq_lightning.data.nyuv2 import write_standin

    work = tmp_path_factory.mktemp("recipes-ddp-dense")
    write_standin(work / "data" / "nyuv2", train=4, val=4, size=(32, 32))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)
    out = {}
    for name, config, extra in DENSE_RECIPES:
        cmd = [str(TVQ), _command(config), "-c", str(CONFIGS / f"{config}.yaml"), *DDP, *DENSE_TINY, *extra]
        out[name] = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=240)
    return work, out


def test_every_config_is_covered():
    covered = {c for _, c, _ in RECIPES} | {c for _, c, _ in DENSE_RECIPES}
    assert sorted(covered) == sorted(p.stem for p in CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("name", [r[0] for r in DENSE_RECIPES])
def test_dense_recipe_exits_0_under_ddp(dense_runs, name):
    _, out = dense_runs
    proc = out[name]
    assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{proc.stderr[-4000:]}"
