"""Run by test_ddp.py: ``python _ddp_quantize_script.py OUT``.

A 2-process gloo DDP fine-tune with BitAllocation + QuantizeOnSave. ``Trainer(strategy="ddp")``
re-launches this script for rank 1; each rank writes ``OUT/rank<r>.json`` and its final encoder
weights ``OUT/encoder<r>.pt``.
"""
import copy
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from conftest import QUIET, make_encoder, toy  # this script's own directory
from tvq_lightning.callbacks import BitAllocation, QuantizeOnSave
from tvq_lightning.modules.finetune import FineTuneModule

if __name__ == "__main__":
    out = Path(sys.argv[1])
    pl.seed_everything(0)
    enc = make_encoder()
    start = copy.deepcopy(enc.state_dict())
    module = FineTuneModule(enc, "a", lr=3e-3, warmup_steps=1, probe_steps=30)
    alloc = BitAllocation(budget=3.0, num_batches=2)
    trainer = pl.Trainer(strategy="ddp", devices=2, max_steps=4, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[QuantizeOnSave(str(out / "store"), save_pretrained=str(out / "pre.safetensors")),
                                    alloc], **QUIET)
    trainer.fit(module, toy("a"))
    r = trainer.global_rank
    torch.save(enc.state_dict(), out / f"encoder{r}.pt")
    if r == 0:
        torch.save(start, out / "start.pt")
    (out / f"rank{r}.json").write_text(json.dumps({
        "sensitivities": alloc.sensitivities,
        "allocation": None if alloc.allocation is None else alloc.allocation.to_json(),
        "head": module.head.weight.tolist()}))
