"""Tiny models and synthetic fine-tunes shared by the tests, the demo and the benchmarks.

Nothing here downloads anything. Weights are made heavy-tailed like CLIP's (a few large outliers
per matrix), and synthetic task vectors are small low-rank-plus-noise updates, about 100x
narrower in range than the weights, as real fine-tuning gives.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .store.io import SafetensorsStreamWriter, header_upper_bound


class TinyEncoder(nn.Module):
    """A miniature ViT image encoder: patch conv, transformer blocks, LayerNorm, projection."""

    def __init__(self, width: int = 64, depth: int = 2, heads: int = 4, patch: int = 8, image: int = 32, out_dim: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros((image // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
            for _ in range(depth))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], 1) + self.positional_embedding
        x = self.ln_pre(x)
        for blk in self.blocks:
            x = blk(x)
        return self.ln_post(x[:, 0]) @ self.proj


def heavy_tailed_(t: torch.Tensor, generator: torch.Generator, std: float = 0.02, outliers: float = 1e-4) -> torch.Tensor:
    """Fill ``t`` with N(0, std^2) plus a fraction of outliers of magnitude ~50 std (CLIP-like)."""
    with torch.no_grad():
        t.copy_(torch.randn(t.shape, generator=generator) * std)
        mask = torch.rand(t.shape, generator=generator) < outliers
        t[mask] = torch.randn(int(mask.sum()), generator=generator) * 50 * std
    return t


def tiny_pretrained(seed: int = 0, **kwargs) -> TinyEncoder:
    """A :class:`TinyEncoder` with heavy-tailed matrices (a stand-in for pre-trained weights)."""
    g = torch.Generator().manual_seed(seed)
    model = TinyEncoder(**kwargs)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            heavy_tailed_(p, g, outliers=1e-3 if p.numel() > 2000 else 0.0)
        elif "weight" in name:
            with torch.no_grad():
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            with torch.no_grad():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model


def synthetic_task_vector(sd: dict[str, torch.Tensor], seed: int, scale: float = 1e-3, rank: int = 4) -> dict[str, torch.Tensor]:
    """A fine-tuning-like update: low rank plus noise for matrices, small noise elsewhere."""
    g = torch.Generator().manual_seed(seed)
    tau = {}
    for k, v in sd.items():
        if not v.is_floating_point():
            continue
        if v.dim() >= 2:
            m = v.reshape(v.shape[0], -1)
            r = min(rank, *m.shape)
            low = torch.randn(m.shape[0], r, generator=g) @ torch.randn(r, m.shape[1], generator=g) / r ** 0.5
            tau[k] = (scale * (low + 0.5 * torch.randn(m.shape, generator=g))).reshape(v.shape)
        else:
            tau[k] = scale * torch.randn(v.shape, generator=g)
    return tau


def synthetic_finetunes(pretrained: dict[str, torch.Tensor], num_tasks: int, seed: int = 1, scale: float = 1e-3) -> list[dict[str, torch.Tensor]]:
    """``num_tasks`` fine-tuned state dicts theta_0 + tau_t (integer buffers copied)."""
    out = []
    for t in range(num_tasks):
        tau = synthetic_task_vector(pretrained, seed * 1000 + t, scale)
        out.append({k: (v + tau[k]).to(v.dtype) if k in tau else v.clone() for k, v in pretrained.items()})
    return out


def save_safetensors(sd: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write a state dict as .safetensors (atomically)."""
    path = Path(path)
    specs = {k: ("F32", v.dim()) for k, v in sd.items()}
    with SafetensorsStreamWriter(path, header_upper_bound(specs, sum(v.numel() * 8 for v in sd.values()))) as w:
        for k, v in sd.items():
            w.add(k, v.contiguous())
        w.close()
    return path


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
