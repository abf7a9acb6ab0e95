"""Shared set-up of the model tests: a tiny CLIP small enough to build in milliseconds."""
from __future__ import annotations

import pytest
import torch

from tvq_lightning.models.tiny_clip import TinyClip

SMALL_CLIP = {"channels": (8, 8, 16, 16), "width": 32, "embed_dim": 16, "text_width": 32, "text_heads": 2,
              "text_layers": 1}


@pytest.fixture
def small_clip():
    """``small_clip(**overrides) -> TinyClip`` of :data:`SMALL_CLIP` sizes, seeded (equal calls, equal weights)."""
    def make(**overrides) -> TinyClip:
        torch.manual_seed(0)
        return TinyClip(**{**SMALL_CLIP, **overrides})
    return make
