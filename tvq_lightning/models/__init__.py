"""Encoders plus per-task heads (open_clip, timm, any nn.Module)."""
from .dense import DenseEncoder, DenseHead
from .heads import ClassificationHead
from .multitask import MultiTaskModel
from .tiny import TinyEncoder

__all__ = ["ClassificationHead", "DenseEncoder", "DenseHead", "MultiTaskModel", "TinyEncoder"]
