"""Fixtures for the adaptation tests: theta_0 of a tiny encoder, synthetic fine-tunes, stores."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tvq_lightning.store import StoreConfig, quantize_to_store
from tvq_lightning.testing import synthetic_finetunes, tiny_pretrained

TASKS = ["t0", "t1", "t2"]
ZERO_KEY = "ln_pre.bias"          # task t1 leaves it unchanged: its vector is exactly zero


@dataclass
class Stores:
    pre: dict[str, torch.Tensor]
    paths: dict[str, Path]

    def encoder(self):
        enc = tiny_pretrained(0, width=32, depth=1)
        enc.load_state_dict(self.pre)
        return enc


@pytest.fixture(scope="session")
def stores(tmp_path_factory) -> Stores:
    pre = {k: v.detach().clone().contiguous() for k, v in tiny_pretrained(0, width=32, depth=1).state_dict().items()}
    fts = dict(zip(TASKS, synthetic_finetunes(pre, len(TASKS), seed=3, scale=2e-3)))
    fts["t1"][ZERO_KEY] = pre[ZERO_KEY].clone()
    fts["t2"]["blocks.0.linear1.weight"] = pre["blocks.0.linear1.weight"].clone()   # a zero quantized key
    root = tmp_path_factory.mktemp("adapt-stores")
    paths = {}
    for name, cfg in {"fp32": StoreConfig("fp32"), "tvq": StoreConfig("tvq", bits=4), "tvq2": StoreConfig("tvq", bits=2),
                      "rtvq": StoreConfig("rtvq"), "fq": StoreConfig("fq", bits=8),
                      "channel": StoreConfig("tvq", bits=3, granularity="channel")}.items():
        paths[name] = root / name
        quantize_to_store(pre, fts, paths[name], cfg, progress=False)
    return Stores(pre, paths)


@pytest.fixture(scope="session")
def crafted(tmp_path_factory) -> Stores:
    """theta_0 = 0 and integer task vectors (exact in fp32) full of ties and exactly-zero sums."""
    g = torch.Generator().manual_seed(5)
    shapes = {"w1": (6, 5), "b1": (6,), "w2": (4, 6), "b2": (4,)}
    pre = {k: torch.zeros(s) for k, s in shapes.items()}
    fts = {t: {} for t in TASKS}
    for k, s in shapes.items():
        a = torch.randint(-2, 4, s, generator=g).float()
        b = torch.randint(-3, 3, s, generator=g).float()
        c = torch.where(torch.rand(s, generator=g) < 0.5, -(a + b), torch.randint(-3, 4, s, generator=g).float())
        for t, v in zip(TASKS, (a, b, c)):
            fts[t][k] = v
    path = tmp_path_factory.mktemp("adapt-crafted") / "fp32"
    quantize_to_store(pre, fts, path, StoreConfig("fp32"), progress=False)
    return Stores(pre, {"fp32": path})
