"""Data modules: multi-task classification suites, NYUv2 (dense).

The classes are imported on first use (they need Lightning): importing a sub-package such as
:mod:`.zoo`'s task catalog (``tvq heads``, hence every ``tvq`` command) must not import Lightning.
"""
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .multitask import ImagesOnly, IndexedImages, MultiTaskDataModule, TensorTasks, ToyTasks
    from .nyuv2 import NYUv2

__all__ = ["ImagesOnly", "IndexedImages", "MultiTaskDataModule", "NYUv2", "TensorTasks", "ToyTasks"]


def __getattr__(name: str):
    if name == "NYUv2":
        from .nyuv2 import NYUv2

        return NYUv2
    if name in __all__:
        from . import multitask

        return getattr(multitask, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
