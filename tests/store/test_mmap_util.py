"""Dropping mapped pages (whole map or one key's data) never changes what tensors read."""
from __future__ import annotations

import mmap

import torch

from tvq_lightning.store.checkpoints import open_checkpoint
from tvq_lightning.store.mmap_util import PAGE, PageReleaser
from tvq_lightning.testing import save_safetensors


def test_release_key_and_all_keep_values(tmp_path):
    sd = {"a": torch.randn(3000), "b": torch.randn(5, 700), "c": torch.randn(1)}
    save_safetensors(sd, tmp_path / "w.safetensors")
    with open_checkpoint(tmp_path / "w.safetensors") as lazy:
        views = {k: lazy[k] for k in lazy}
        for k in sd:
            lazy.release(k)
            assert torch.equal(views[k], sd[k])
        lazy.release()
        assert all(torch.equal(views[k], sd[k]) for k in sd)


def test_releaser_keeps_partial_pages(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(bytes(range(256)) * (3 * PAGE // 256))
    with open(p, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    r = PageReleaser(mm)
    for start, end in [(1, PAGE + 5), (0, None), (PAGE, 2 * PAGE), (5, 3), (2 * PAGE + 1, 10 * PAGE)]:
        r.release(start, end)
        assert mm[:] == p.read_bytes()
