"""Shared set-up for the benchmarks: the open_clip ViT-B-32 image encoder and synthetic fine-tunes.

Checkpoints are generated once into a work directory (safetensors) and reused by later runs.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tvq_lightning.store.checkpoints import load_state_dict  # noqa: E402
from tvq_lightning.data.synthetic import synthetic_task_vector  # noqa: E402
from tvq_lightning.store.st_stream import save_safetensors  # noqa: E402


def vit_b32_checkpoints(workdir: Path, num_tasks: int, seed: int = 0) -> tuple[Path, dict[str, Path]]:
    """theta_0 = open_clip ViT-B-32 image encoder (random init, no download) and T fine-tunes."""
    workdir.mkdir(parents=True, exist_ok=True)
    pre_path = workdir / "vitb32_pretrained.safetensors"
    if not pre_path.exists():
        import open_clip

        torch.manual_seed(seed)
        model = open_clip.create_model("ViT-B-32", pretrained=None)
        sd = {k: v.detach().contiguous() for k, v in model.visual.state_dict().items()}
        save_safetensors(sd, pre_path)
    pre = None
    paths = {}
    for t in range(num_tasks):
        p = workdir / f"vitb32_task{t}.safetensors"
        if not p.exists():
            pre = pre or load_state_dict(pre_path)
            tau = synthetic_task_vector(pre, seed=1000 + t, scale=1e-3)
            save_safetensors({k: v + tau[k] if k in tau else v for k, v in pre.items()}, p)
        paths[f"task{t}"] = p
    return pre_path, paths


def warm_page_cache(paths) -> None:
    """Read every file once so that timings compare compute, not the first disk read."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def timed(fn, repeat: int = 3, setup=None) -> tuple[float, object]:
    """Best wall time of ``repeat`` runs (and the last result); ``setup()`` runs untimed before each."""
    best, res = float("inf"), None
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t0)
    return best, res


def publish(out: Path, name: str, table: str, data) -> None:
    """Print ``table`` and write it as ``out/NAME.md`` beside ``out/NAME.json`` (``data``)."""
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(table + "\n")
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
