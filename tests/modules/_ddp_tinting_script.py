"""Run by test_tinting.py's DDP test: ``python _ddp_tinting_script.py ASSETS OUT``.

``Trainer(strategy="ddp", devices=2)`` (gloo on CPU) re-launches this
script for rank 1. Two short fits: Tinting++ with per-task head tints and one step per task, then
a block tint with joint steps. Each rank writes ``OUT/rank<r>.json``: the coefficients and the
tinted layer's weights after each fit, and the kept fraction it logged.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import _adapt_setup as A
from tvq_lightning.data import ToyTasks
from tvq_lightning.modules.tinting import Tinting
from tvq_lightning.testing import TinyEncoder

TASKS = ["a", "b"]                     # the tasks of the shared ``assets`` fixture (conftest.py)
STEPS = 4
RUNS = {"head": dict(tint="head", step_mode="task"), "block": dict(tint="block:blocks.0", step_mode="joint")}


def tinting(assets: Path, **kw) -> Tinting:
    return Tinting(TinyEncoder(width=32, depth=1), str(assets / "store"), TASKS, heads_dir=str(assets / "heads"),
                   pretrained=str(assets / "pretrained.safetensors"), **kw)


def main(assets: str, out: str) -> None:
    torch.set_num_threads(1)
    result = {}
    for name, kw in RUNS.items():
        module = tinting(Path(assets), **kw)
        trainer = A.trainer(devices=2, strategy="ddp", max_steps=STEPS)
        trainer.fit(module, datamodule=ToyTasks(tasks=TASKS, batch_size=8, test_size=32))
        result[name] = {"coefficients": module.lambdas().detach().tolist(),
                        "tinted": [p.detach().flatten().tolist() for p in module.tint_parameters()],
                        "kept": float(trainer.callback_metrics["train/kept"]), "steps": trainer.global_step}
        result.update(rank=trainer.global_rank, world=trainer.world_size)
    Path(out, f"rank{result['rank']}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
