"""Tiny fine-tuning runs shared by the callback tests (a second or less each on a CPU)."""
import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch

from tvq_lightning.data import ToyTasks
from tvq_lightning.modules.finetune import FineTuneModule
from tvq_lightning.testing import TinyEncoder

warnings.filterwarnings("ignore", ".*does not have many workers.*")
QUIET = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False)


def make_encoder() -> TinyEncoder:
    """theta_0: a tiny ViT whose features separate the toy classes a little."""
    g = torch.Generator().manual_seed(0)
    enc = TinyEncoder(width=32, depth=1, heads=2, patch=4, image=16, out_dim=16)
    with torch.no_grad():
        for p in enc.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return enc


def toy(task: str) -> ToyTasks:
    return ToyTasks(tasks=("a", "b"), num_classes=4, image_size=16, train_size=128, val_size=128, test_size=256,
                    noise=3.0, batch_size=16, train_task=task)


class Run:
    """A finished fine-tuning run: its module, trainer, and the starting encoder weights."""

    make_encoder = staticmethod(make_encoder)
    toy = staticmethod(toy)
    QUIET = QUIET

    def __init__(self, task, callbacks=(), steps=10, encoder=None, lr=3e-3, **trainer_kw):
        self.encoder = encoder if encoder is not None else make_encoder()
        self.start = copy.deepcopy(self.encoder.state_dict())
        self.dm = toy(task)
        self.module = FineTuneModule(self.encoder, task, lr=lr, warmup_steps=2, probe_steps=50)
        pl.seed_everything(0)
        self.trainer = pl.Trainer(max_steps=steps, num_sanity_val_steps=0, limit_val_batches=0,
                                  callbacks=list(callbacks), **{**QUIET, **trainer_kw})
        self.trainer.fit(self.module, self.dm)

    def tau(self) -> dict[str, torch.Tensor]:
        return {k: v.float() - self.start[k].float() for k, v in self.encoder.state_dict().items()}


@pytest.fixture
def run():
    return Run
