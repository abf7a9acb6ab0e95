"""Fixtures for the CLI tests: checkpoint files on disk and an in-process ``tvq`` runner."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tvq_lightning.cli.main import main
from tvq_lightning.data.synthetic import synthetic_finetunes
from tvq_lightning.models.tiny import tiny_pretrained
from tvq_lightning.store.st_stream import save_safetensors


@pytest.fixture(scope="session")
def _weights():
    model = tiny_pretrained(0, width=32, depth=1)
    pre = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return pre, synthetic_finetunes(pre, 3, seed=1)


@dataclass
class Ckpts:
    root: Path
    pre_sd: dict[str, torch.Tensor]
    ft_sds: dict[str, dict[str, torch.Tensor]]
    pre: Path
    fts: dict[str, Path]

    def finetuned_args(self, *names: str) -> list[str]:
        return [f"{n}={self.fts[n]}" for n in (names or self.fts)]

    def write(self, name: str, sd: dict[str, torch.Tensor]) -> Path:
        return save_safetensors(sd, self.root / f"{name}.safetensors")


@pytest.fixture
def ckpts(tmp_path, _weights) -> Ckpts:
    pre, fts = _weights
    root = tmp_path / "ckpt"
    root.mkdir()
    ft_sds = {f"t{i}": {k: v.clone() for k, v in f.items()} for i, f in enumerate(fts)}
    pre_path = save_safetensors(pre, root / "pre.safetensors")
    paths = {n: save_safetensors(sd, root / f"{n}.safetensors") for n, sd in ft_sds.items()}
    return Ckpts(root, {k: v.clone() for k, v in pre.items()}, ft_sds, pre_path, paths)


@dataclass
class Result:
    rc: int
    out: str
    err: str


@pytest.fixture
def tvq(capsys):
    """Run ``tvq ARGS`` in-process; returns exit code, stdout and stderr."""
    def run(*args) -> Result:
        capsys.readouterr()
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse: --help, usage errors
            rc = e.code if isinstance(e.code, int) else 1
        cap = capsys.readouterr()
        return Result(rc, cap.out, cap.err)

    return run


def _snapshot(root: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
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
    """Every file and directory under a root (hidden ones included), with their bytes."""
    return _snapshot
