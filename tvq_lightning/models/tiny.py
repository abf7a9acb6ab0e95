"""A miniature ViT image encoder and CLIP-like heavy-tailed weights for it (no download).

Weights are made heavy-tailed like CLIP's (a few large outliers per matrix). Used by the
``tiny`` encoder kind, the tiny configs, the tests and the benchmarks.
"""
from __future__ import annotations

import torch
from torch import nn


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
