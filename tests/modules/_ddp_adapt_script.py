"""Run by test_adamerging.py's DDP tests: ``python _ddp_adapt_script.py ROOT OUT``.

``Trainer(strategy="ddp", devices=2)`` re-launches this script for rank 1; each rank writes
``OUT/rank<r>.json``. The functions are also imported by the tests for the 1-process reference.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import _adapt_setup as A
from tvq_lightning.modules.adamerging import AdaMerging
from tvq_lightning.modules.evaluate import MergedEvaluation

EVAL_DM = dict(tasks=A.TASKS, num_classes=A.NUM_CLASSES, test_size=45, eval_batch_size=8, train_size=8, val_size=8)
ADA_DM = dict(test_size=16, batch_size=8)     # per rank; the 1-process reference uses 16
STEPS = 4


def evaluation(setup) -> MergedEvaluation:
    return MergedEvaluation(setup.encoder(), A.TASKS, heads=setup.heads, store=str(setup.stores["tvq"]), method="ties")


def adamerging(setup) -> AdaMerging:
    return AdaMerging(setup.encoder(), str(setup.stores["tvq"]), heads=setup.heads, granularity="layer", lr=1e-2)


def main(root: str, out: str) -> None:
    """Both checks in one launch (each DDP launch costs two interpreter start-ups)."""
    torch.set_num_threads(1)
    setup = A.build(root)
    trainer = A.trainer(devices=2, strategy="ddp")
    module = evaluation(setup)
    trainer.test(module, datamodule=A.ToyTasks(**EVAL_DM), verbose=False)  # test sets shard without padding
    result = {"results": module.results, "sample_counts": module.sample_counts,
              "local_sample_counts": module.local_sample_counts}
    trainer = A.trainer(devices=2, strategy="ddp", max_steps=STEPS)
    module = adamerging(setup)
    trainer.fit(module, datamodule=A.datamodule(**ADA_DM))
    result.update(coefficients=module.lambdas().detach().tolist(), rank=trainer.global_rank, world=trainer.world_size)
    Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
