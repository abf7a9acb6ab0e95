"""Data modules: multi-task classification suites."""
from .multitask import ImagesOnly, MultiTaskDataModule, ToyTasks

__all__ = ["ImagesOnly", "MultiTaskDataModule", "ToyTasks"]
