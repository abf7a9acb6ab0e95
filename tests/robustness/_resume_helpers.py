"""Shared by test_resume.py and test_ddp_equality.py: the tiny recipes' inputs and ``tvq``
console-script runs in a subprocess.

:func:`tiny_work` makes a working directory holding what ``configs/finetune_tiny.yaml`` writes
(``runs/tiny/{pretrained.safetensors,heads/,store/}``, built once per session by
:func:`tvq_lightning.testing.make_tta_assets`), so the shipped configs run there unchanged.
:class:`PauseAt` is a callback the interrupted runs load (``PYTHONPATH`` holds this folder): it
blocks the training loop at a given step, after that step's checkpoint is on disk, so the test
kills the process at a known point.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
TVQ = Path(sys.executable).with_name("tvq")
HERE = Path(__file__).resolve().parent
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
QUIET = ["--trainer.logger", "false", "--trainer.enable_model_summary", "false", "--trainer.enable_progress_bar", "false"]


class PauseAt(pl.Callback):
    """Block the fit loop before the first batch at ``global_step >= step`` (the checkpoints of
    the steps before it are written by then) and write ``marker``: the test then SIGKILLs the run."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            Path(self.marker).write_text(str(trainer.global_step))
            time.sleep(600)


def tiny_work(tmp_path_factory, name: str) -> Path:
    """A fresh working directory ``name`` with the tiny recipes' inputs under ``runs/tiny``
    (built once per session, then copied)."""
    from tvq_lightning.testing import make_tta_assets

    assets = tmp_path_factory.getbasetemp() / "tvq-tiny-assets"
    make_tta_assets(assets, steps=30, reuse=True)
    work = tmp_path_factory.mktemp(name)
    shutil.copytree(assets, work / "runs" / "tiny")
    return work


def env() -> dict[str, str]:
    out = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)}
    out.pop("MASTER_PORT", None)
    return out


def command(config: str, *args, callbacks: list[dict] | None = None) -> list[str]:
    """``tvq <fit|test> -c configs/<config>.yaml ARGS`` (the sub-command is the config's first line's);
    ``callbacks`` replaces the config's ``trainer.callbacks``."""
    sub = (CONFIGS / f"{config}.yaml").read_text().splitlines()[0].split()[2]
    cmd = [str(TVQ), sub, "-c", str(CONFIGS / f"{config}.yaml"), *QUIET, *map(str, args)]
    if callbacks is not None:
        cmd += ["--trainer.callbacks", json.dumps(callbacks)]
    return cmd


def start(work: Path, cmd: list[str], **kw) -> subprocess.Popen:
    """Start ``cmd`` in ``work`` (output captured)."""
    opts = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **kw}
    return subprocess.Popen(cmd, cwd=work, env=env(), **opts)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    """Wait for a :func:`start`-ed run; it must exit 0. Its ``(stdout, stderr)``."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    assert proc.returncode == 0, f"{' '.join(proc.args[1:])}: exit {proc.returncode}\n{err[-4000:]}"
    return out, err


def tvq(work: Path, cmd: list[str], timeout: float = 240) -> tuple[str, str]:
    """Run ``cmd`` in ``work``; it must exit 0. Its ``(stdout, stderr)``."""
    return finish(start(work, cmd), timeout)


def checkpoint(dirpath: str | Path, every: int, **kw) -> dict:
    """A ModelCheckpoint keeping a checkpoint every ``every`` steps (and ``last.ckpt``)."""
    return {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(dirpath), "every_n_train_steps": every, "save_top_k": -1, "save_last": True,
                          "filename": "{step}", **kw}}


def pause(step: int, marker: str | Path) -> dict:
    return {"class_path": "_resume_helpers.PauseAt", "init_args": {"step": step, "marker": str(marker)}}


def state_dict(path: str | Path) -> dict:
    """The module's weights in a Lightning checkpoint."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
