"""Data modules: multi-task classification suites."""
from .multitask import (
    ImagesOnly,
    IndexedImages,
    MultiTaskDataModule,
    TensorTasks,
    ToyTasks,
)

__all__ = ["ImagesOnly", "IndexedImages", "MultiTaskDataModule", "TensorTasks", "ToyTasks"]
