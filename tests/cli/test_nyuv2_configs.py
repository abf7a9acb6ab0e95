"""configs/nyuv2_{finetune,evaluate,adamerging}.yaml run end to end on a tiny NYUv2 stand-in with a
tiny smp encoder (tu-resnet10t, 2 steps, one test batch)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from tvq_lightning.cli.main import main
from tvq_lightning.data.nyuv2 import NYUV2_TASKS, write_standin

pytest.importorskip("segmentation_models_pytorch")
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--data.num_workers", "0",
        "--model.encoder.init_args.name", "tu-resnet10t", "--model.encoder.init_args.output_stride", "32"]
HEAD = ["--model.head.init_args.encoder_channels", "[3, 64, 64, 128, 256, 512]",
        "--model.head.init_args.decoder_channels", "8"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("nyuv2-cli")
    write_standin(d / "data" / "nyuv2", train=4, val=2, size=(32, 32))
    old = os.getcwd()
    os.chdir(d)
    yield d
    os.chdir(old)


def test_nyuv2_configs_run(workdir):
    def tvq(cmd: str, name: str, *extra: str) -> int:
        return main([cmd, "-c", str(CONFIGS / f"{name}.yaml"), *TINY, *extra])

    for task, out in (("segmentation", 13), ("depth", 1), ("normal", 3)):
        assert tvq("fit", "nyuv2_finetune", *HEAD, "--model.encoder.init_args.weights", "null",
                   "--model.task", task, "--model.task_type", task, "--data.train_task", task,
                   "--model.head.init_args.out_channels", str(out), "--model.warmup_steps", "0",
                   "--trainer.max_steps", "2", "--data.batch_size", "2") == 0
    for scheme in ("fp32", "tvq4", "tvq2", "rtvq"):
        assert (workdir / "runs" / "nyuv2" / f"store_{scheme}" / "layout.json").is_file()
    assert sorted(p.stem for p in (workdir / "runs" / "nyuv2" / "heads").glob("*.safetensors")) == sorted(NYUV2_TASKS)
    limit = ["--trainer.limit_test_batches", "1", "--data.batch_size", "2"]
    assert tvq("test", "nyuv2_evaluate", *limit) == 0
    assert tvq("test", "nyuv2_evaluate", *limit, "--model.store", "runs/nyuv2/store_rtvq", "--model.method", "emr",
               "--model.method_options", "{}") == 0
    assert tvq("fit", "nyuv2_adamerging", *limit, "--trainer.max_steps", "2") == 0
    # predict: per-task predictions of the merged model (maps for the dense tasks)
    assert tvq("predict", "nyuv2_evaluate", "--trainer.limit_predict_batches", "1", "--data.batch_size", "2") == 0
    assert (workdir / "runs" / "nyuv2" / "adamerging" / "coefficients.safetensors").is_file()
