"""Data modules: multi-task classification suites."""
from .multitask import ImagesOnly, IndexedImages, MultiTaskDataModule, ToyTasks

__all__ = ["ImagesOnly", "IndexedImages", "MultiTaskDataModule", "ToyTasks"]
