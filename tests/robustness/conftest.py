"""Shared fixtures of the robustness tests: a tiny world (theta_0, three fine-tunes, stores and a
merged model) built once per session and copied per test, an in-process ``tvq`` runner, and a
tree hash that proves a refused command changed nothing."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tvq_lightning.data.synthetic import synthetic_finetunes
from tvq_lightning.merging import plan_merge, write_merged
from tvq_lightning.models.tiny import tiny_pretrained
from tvq_lightning.store import StoreConfig, quantize_to_store
from tvq_lightning.store.st_stream import save_safetensors

from _robust_helpers import run_tvq

TASKS = ("t0", "t1", "t2")
STORES = {"tvq": StoreConfig(scheme="tvq", bits=4), "rtvq": StoreConfig(scheme="rtvq"), "fp32": StoreConfig(scheme="fp32")}


def _sd(seed: int) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in tiny_pretrained(seed, width=16, depth=1).state_dict().items()}


@pytest.fixture(scope="session")
def _world_src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    pre = _sd(0)
    pre["bn.num_batches_tracked"] = torch.tensor(5, dtype=torch.int64)
    fts = synthetic_finetunes({k: v for k, v in pre.items() if v.is_floating_point()}, len(TASKS), seed=1)
    for i, ft in enumerate(fts):
        ft["bn.num_batches_tracked"] = torch.tensor(10 + i, dtype=torch.int64)
    ck = root / "ckpt"
    ck.mkdir()
    save_safetensors(pre, ck / "pre.safetensors")
    save_safetensors(_sd(7), ck / "other.safetensors")
    for n, ft in zip(TASKS, fts):
        save_safetensors(ft, ck / f"{n}.safetensors")
    for name, cfg in STORES.items():
        quantize_to_store(ck / "pre.safetensors", {n: ck / f"{n}.safetensors" for n in TASKS}, root / name, cfg,
                          progress=False)
    write_merged(plan_merge(root / "tvq", ck / "pre.safetensors", "task_arithmetic"), root / "merged.safetensors")
    return root


@dataclass
class World:
    """A private copy of the session's world under ``root`` (tests may damage it)."""

    root: Path

    @property
    def pre(self) -> Path:
        return self.root / "ckpt" / "pre.safetensors"

    def ft(self, name: str) -> Path:
        return self.root / "ckpt" / f"{name}.safetensors"

    def ft_args(self, *names: str) -> list[str]:
        return [f"{n}={self.ft(n)}" for n in (names or TASKS)]

    def store(self, name: str = "tvq") -> Path:
        return self.root / name

    @property
    def merged(self) -> Path:
        return self.root / "merged.safetensors"


@pytest.fixture
def world(_world_src, tmp_path) -> World:
    root = tmp_path / "w"
    shutil.copytree(_world_src, root)
    return World(root)


@pytest.fixture
def tvq(capsys):
    """``tvq ARGS`` in-process: exit status, stdout, stderr."""
    return lambda *args: run_tvq(capsys, args)
