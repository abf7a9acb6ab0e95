"""Shared by the evaluation / AdaMerging tests and their DDP scripts: a tiny encoder (theta_0),
linear-probe heads, three short real fine-tunes, and their fp32 / TVQ-INT4 / RTVQ stores.

Everything is deterministic, so a DDP script that calls :func:`build` on the same directory sees
exactly the test's objects (files are written once and reused).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from tvq_lightning.data.multitask import ToyTasks
from tvq_lightning.models.heads import ClassificationHead
from tvq_lightning.store import StoreConfig, quantize_to_store
from tvq_lightning.testing import TinyEncoder, tiny_pretrained

TASKS = ["a", "b", "c"]
NUM_CLASSES = 4
SCHEMES = {"fp32": StoreConfig("fp32"), "tvq": StoreConfig("tvq", bits=4), "rtvq": StoreConfig("rtvq")}

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*sync_dist=True.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")


@dataclass
class AdaptSetup:
    root: Path
    pre: dict[str, torch.Tensor]
    heads: dict[str, ClassificationHead]
    heads_dir: Path
    stores: dict[str, Path]

    def encoder(self) -> TinyEncoder:
        enc = encoder()
        enc.load_state_dict(self.pre)
        return enc


def encoder() -> TinyEncoder:
    return tiny_pretrained(0, width=32, depth=1)


def datamodule(tasks=TASKS, **kw) -> ToyTasks:
    opts = dict(num_classes=NUM_CLASSES, train_size=128, val_size=32, test_size=48, batch_size=16, seed=0)
    opts.update(kw)
    return ToyTasks(tasks, **opts)


def trainer(**kw) -> pl.Trainer:
    opts = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
    opts.update(kw)
    return pl.Trainer(**opts)


def _probe(feats: torch.Tensor, labels: torch.Tensor) -> ClassificationHead:
    head = ClassificationHead(torch.randn(NUM_CLASSES, feats.shape[1]) * 0.1)
    opt = torch.optim.Adam(head.parameters(), lr=0.1)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(head(feats), labels).backward()
        opt.step()
    return head


def build(root: str | Path) -> AdaptSetup:
    """Create (or reuse) everything under ``root``."""
    root = Path(root)
    heads_dir = root / "heads"
    stores = {s: root / f"store-{s}" for s in SCHEMES}
    torch.manual_seed(0)
    base = encoder()
    pre = {k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}
    if not all(p.exists() for p in stores.values()) or not heads_dir.exists():
        dm = datamodule()
        heads, fts = {}, {}
        for t in TASKS:
            x, y = dm.split(t, "train").tensors
            with torch.no_grad():
                feats = base(x)
            heads[t] = _probe(feats, y)
            enc = copy.deepcopy(base)
            opt = torch.optim.Adam(enc.parameters(), lr=2e-3)
            for step in range(20):                      # a short real fine-tune with the head frozen
                idx = torch.arange(step * 32, step * 32 + 32) % x.shape[0]
                opt.zero_grad()
                F.cross_entropy(heads[t](enc(x[idx])), y[idx]).backward()
                opt.step()
            fts[t] = {k: v.detach().clone().contiguous() for k, v in enc.state_dict().items()}
        heads_dir.mkdir(parents=True, exist_ok=True)
        for t, h in heads.items():
            h.save(heads_dir / f"{t}.safetensors")
        for s, cfg in SCHEMES.items():
            if not stores[s].exists():
                quantize_to_store(pre, fts, stores[s], cfg, progress=False)
    heads = {t: ClassificationHead.load(heads_dir / f"{t}.safetensors") for t in TASKS}
    return AdaptSetup(root, pre, heads, heads_dir, stores)
