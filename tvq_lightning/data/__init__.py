"""Data modules: multi-task classification suites, NYUv2 (dense)."""
from .multitask import (
    ImagesOnly,
    IndexedImages,
    MultiTaskDataModule,
    TensorTasks,
    ToyTasks,
)
from .nyuv2 import NYUv2

__all__ = ["ImagesOnly", "IndexedImages", "MultiTaskDataModule", "NYUv2", "TensorTasks", "ToyTasks"]
