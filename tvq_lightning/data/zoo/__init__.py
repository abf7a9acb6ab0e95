"""Class names and prompt templates of the CLIP model-merging tasks (8 / 14 / 20 task suites).

``list_tasks("8")`` lists a suite, ``get_task("cars")`` gives a :class:`TaskInfo` (class names in
label order, templates); the data are JSON files shipped in ``classnames/``. See
:mod:`.catalog` and ``docs/heads.md``. :class:`CLIPSuiteDataModule` (:mod:`.datamodule`, imported on
first use: it needs Lightning) reads the tasks' datasets (``docs/datasets.md``).
"""
from .catalog import (
    DEFAULT_TEMPLATES,
    SUITES,
    TaskInfo,
    TaskSpecError,
    UnknownTaskError,
    get_task,
    list_tasks,
    load_task_file,
    task_from_dict,
)

__all__ = ["CLIPSuiteDataModule", "DEFAULT_TEMPLATES", "SUITES", "TaskInfo", "TaskSpecError", "UnknownTaskError", "get_task", "list_tasks",
           "load_task_file", "task_from_dict"]


def __getattr__(name: str):
    if name == "CLIPSuiteDataModule":
        from .datamodule import CLIPSuiteDataModule

        return CLIPSuiteDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
