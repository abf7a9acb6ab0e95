"""What the tests share: tiny assets for test-time adaptation (:func:`make_tta_assets`).

Nothing under ``tvq_lightning/`` imports this module. The tiny encoder, synthetic fine-tunes and
``save_safetensors`` live in the package proper and are re-exported here for the tests.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .data.synthetic import synthetic_finetunes, synthetic_task_vector
from .models.tiny import TinyEncoder, heavy_tailed_, tiny_pretrained
from .store.st_stream import save_safetensors

__all__ = ["TinyEncoder", "heavy_tailed_", "make_tta_assets", "save_safetensors", "synthetic_finetunes",
           "synthetic_task_vector", "tiny_pretrained"]


def make_tta_assets(out: str | Path, tasks: tuple[str, ...] = ("a", "b"), steps: int = 60, lr: float = 2e-3,
                    seed: int = 0, scheme: str = "tvq", bits: int = 4, reuse: bool = False, **toy) -> dict[str, Path]:
    """A pre-trained tiny encoder, per-task probe heads, fine-tuned experts and their store, on
    :class:`~tvq_lightning.data.ToyTasks`, for test-time adaptation tests (seconds on a CPU).

    Writes ``out/pretrained.safetensors``, ``out/heads/<task>.safetensors`` (linear probes on the
    pre-trained features: the "zero-shot" heads) and ``out/store`` (each task fine-tuned for
    ``steps`` Adam steps with its head frozen). Returns those paths by name. With ``reuse``, files
    already under ``out`` (from an identical call) are kept.
    """
    from .data import ToyTasks
    from .models.probe import fit_linear_probe
    from .store import StoreConfig, quantize_to_store

    out = Path(out)
    paths = {"pretrained": out / "pretrained.safetensors", "heads_dir": out / "heads", "store": out / "store"}
    if reuse and paths["store"].is_dir() and paths["pretrained"].is_file() and all(
            (out / "heads" / f"{t}.safetensors").is_file() for t in tasks):
        return paths
    (out / "heads").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    enc = tiny_pretrained(seed, width=32, depth=1)
    pre = {k: v.detach().clone().contiguous() for k, v in enc.state_dict().items()}
    finetuned = {}
    for t in tasks:
        dm = ToyTasks(tasks=tasks, train_task=t, seed=seed, **toy)
        head = fit_linear_probe(enc, dm.train_dataloader(), dm.num_classes(t), steps=100)
        head.save(out / "heads" / f"{t}.safetensors")
        model = TinyEncoder(width=32, depth=1)
        model.load_state_dict(pre)
        head.requires_grad_(False)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        done = 0
        while done < steps:
            for x, y in dm.train_dataloader():
                loss = torch.nn.functional.cross_entropy(head(model(x)), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                done += 1
                if done >= steps:
                    break
        finetuned[t] = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    quantize_to_store(pre, finetuned, out / "store", StoreConfig(scheme=scheme, bits=bits), overwrite=True, progress=False)
    save_safetensors(pre, out / "pretrained.safetensors")
    return paths
