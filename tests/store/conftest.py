"""Fixtures for the store tests: a tiny pre-trained encoder, synthetic fine-tunes, their files."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tvq_lightning.testing import save_safetensors, synthetic_finetunes, tiny_pretrained


def _state_dict(seed: int) -> dict[str, torch.Tensor]:
    model = tiny_pretrained(seed, width=32, depth=1)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def _weights() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    pre = _state_dict(0)
    return pre, synthetic_finetunes(pre, 3, seed=1)


@dataclass
class Weights:
    """theta_0 and three fine-tunes (fresh copies per test: tests may edit them)."""

    pre: dict[str, torch.Tensor]
    fts: list[dict[str, torch.Tensor]]

    @property
    def names(self) -> list[str]:
        return [f"t{i}" for i in range(len(self.fts))]

    def tau(self, i: int, key: str) -> torch.Tensor:
        return self.fts[i][key].float() - self.pre[key].float()


@pytest.fixture
def weights(_weights) -> Weights:
    pre, fts = _weights
    return Weights({k: v.clone() for k, v in pre.items()}, [{k: v.clone() for k, v in f.items()} for f in fts])


@pytest.fixture(scope="session")
def other_pretrained() -> dict[str, torch.Tensor]:
    """Weights of the same architecture, but not the ones the stores are built from."""
    return _state_dict(7)


@dataclass
class Files:
    root: Path
    pre: Path
    fts: dict[str, Path]


def write_files(root: Path, w: Weights) -> Files:
    root.mkdir(parents=True, exist_ok=True)
    pre = save_safetensors(w.pre, root / "pre.safetensors")
    fts = {n: save_safetensors(f, root / f"{n}.safetensors") for n, f in zip(w.names, w.fts)}
    return Files(root, pre, fts)


@pytest.fixture
def files(tmp_path, weights) -> Files:
    return write_files(tmp_path / "ckpt", weights)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and directory under ``root`` (hidden ones included): size, mtime and bytes."""
    out: dict[str, tuple] = {}
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = ("dir",)
        for f in filenames:
            p = Path(dirpath) / f
            st = p.stat()
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns, p.read_bytes())
    return out


@pytest.fixture
def snap():
    return snapshot


@pytest.fixture
def make_files():
    return write_files
