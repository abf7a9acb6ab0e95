"""Fixtures for the merging tests: a tiny encoder, three synthetic fine-tunes, stores of each scheme."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tvq_lightning.store import StoreConfig, quantize_to_store
from tvq_lightning.testing import synthetic_finetunes, tiny_pretrained

TASKS = ["t0", "t1", "t2"]


@dataclass
class Setup:
    """theta_0 (with an int64 buffer), the fine-tuned state dicts and the store paths by scheme."""

    pre: dict[str, torch.Tensor]
    fts: dict[str, dict[str, torch.Tensor]]
    stores: dict[str, Path]


@pytest.fixture(scope="session")
def setup(tmp_path_factory) -> Setup:
    model = tiny_pretrained(0, width=32, depth=2)
    pre = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    pre["ln_post.num_batches_tracked"] = torch.tensor(7, dtype=torch.int64)  # an integer buffer
    fts = dict(zip(TASKS, synthetic_finetunes(pre, len(TASKS), seed=1)))
    for t, ft in enumerate(fts.values()):
        ft["ln_post.num_batches_tracked"] = torch.tensor(100 + t, dtype=torch.int64)
    root = tmp_path_factory.mktemp("merging")
    stores = {}
    for scheme in ("fp32", "tvq", "rtvq"):
        stores[scheme] = root / scheme
        quantize_to_store(pre, fts, stores[scheme], StoreConfig(scheme), progress=False)
    return Setup(pre, fts, stores)


@pytest.fixture(scope="session")
def crafted(tmp_path_factory) -> Setup:
    """Integer-valued task vectors (exact in an fp32 store) full of exact ties and exactly-zero sums.

    theta_0 = 0, so tau_t = theta_t exactly: equal magnitudes across and within tasks (MagMax and
    Breadcrumbs tie-breaking, TIES thresholds hit by many entries), sums that cancel exactly
    (EMR's zero-as-minus-one, TIES' majority sign) and TALL comparisons that hold with equality.
    """
    g = torch.Generator().manual_seed(11)
    shapes = {"embed.weight": (6, 5), "blocks.0.fc.weight": (8, 4), "blocks.0.fc.bias": (8,),
              "blocks.1.fc.weight": (8, 4), "blocks.1.fc.bias": (8,), "head.weight": (3, 7)}
    pre = {k: torch.zeros(s) for k, s in shapes.items()}
    pre["head.num_batches_tracked"] = torch.tensor(3, dtype=torch.int64)
    taus = {t: {} for t in TASKS}
    for k, s in shapes.items():
        a = torch.randint(-2, 4, s, generator=g).float()          # mostly positive: a clear majority sign
        b = torch.randint(-3, 3, s, generator=g).float()
        c = -(a + b)                                               # sums to exactly 0 ...
        keep_c = torch.rand(s, generator=g) < 0.5
        c = torch.where(keep_c, c, torch.randint(-3, 4, s, generator=g).float())   # ... on about half
        flip = torch.rand(s, generator=g) < 0.3
        b = torch.where(flip, -a, b)                               # pairs that cancel, equal magnitudes
        for t, v in zip(TASKS, (a, b, c)):
            taus[t][k] = v
    fts = {t: {**{k: taus[t][k].clone() for k in shapes}, "head.num_batches_tracked": torch.tensor(9)} for t in TASKS}
    path = tmp_path_factory.mktemp("crafted") / "fp32"
    quantize_to_store(pre, fts, path, StoreConfig("fp32"), progress=False)
    return Setup(pre, fts, {"fp32": path})
