"""Δm: the relative multi-task performance of a model against per-task baselines, in percent.

    Δm = 100 · mean over (task t, metric m) of  s_m · (M_{t,m} − B_{t,m}) / B_{t,m}

with s_m = +1 for a higher-is-better metric and −1 for a lower-is-better one, M the evaluated
model's values and B the baselines' (the individual fine-tuned models): the number dense
multi-task papers compare (Maninis et al., 2019; Vandenhende et al., 2021). Positive is better
than the baselines. ``average="tasks"`` first averages each task's metrics, then the tasks (the
same number when every task has as many metrics).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import TvqError


def _directions(task: str, spec: Any) -> dict[str, bool]:
    """``{metric: higher_is_better}`` from a mapping, a TaskType, or a registered task-type name."""
    if isinstance(spec, Mapping):
        return {str(k): bool(v) for k, v in spec.items()}
    from ..tasks import TaskType, create_task_type   # the task types import this package

    tt = spec if isinstance(spec, TaskType) else create_task_type(spec)
    return {info.name: info.higher_is_better for info in tt.metric_infos}


def delta_m(results: Mapping[str, Mapping[str, float]], individual: Mapping[str, Mapping[str, float]],
            directions: Mapping[str, Any], metrics: Mapping[str, Sequence[str]] | None = None,
            average: str = "metrics") -> float:
    """Δm in percent (see the module docstring).

    Args:
        results: ``{task: {metric: value}}`` of the evaluated model.
        individual: the baselines, same layout (every included value non-zero).
        directions: per task, ``{metric: higher_is_better}``, a :class:`~tvq_lightning.tasks.TaskType`
            or a registered task-type name (its ``metric_infos`` give the directions); its tasks
            are the tasks averaged over.
        metrics: ``{task: [metric, ...]}``: which metrics count per task (default: every metric
            the task's direction names, i.e. all of its task type's).
        average: ``"metrics"`` (every task-metric pair alike) or ``"tasks"`` (mean per task first).
    """
    if average not in ("metrics", "tasks"):
        raise TvqError(f"delta_m average={average!r}: choose 'metrics' or 'tasks'")
    if not directions:
        raise TvqError("delta_m needs at least one task in directions")
    per_task: list[list[float]] = []
    for task, spec in directions.items():
        dirs = _directions(task, spec)
        names = list(metrics[task]) if metrics is not None and task in metrics else list(dirs)
        if not names:
            raise TvqError(f"delta_m: no metric to compare for task {task!r}")
        terms = []
        for name in names:
            if name not in dirs:
                raise TvqError(f"delta_m: task {task!r} has no direction for metric {name!r} (it has {', '.join(dirs)})")
            try:
                m, b = float(results[task][name]), float(individual[task][name])
            except KeyError:
                raise TvqError(f"delta_m: metric {name!r} of task {task!r} is missing from the results or the "
                               "baselines ({task: {metric: value}})") from None
            if b == 0:
                raise TvqError(f"delta_m: the baseline {name!r} of task {task!r} is 0; a relative change needs non-zero")
            terms.append((m - b) / b * (1.0 if dirs[name] else -1.0))
        per_task.append(terms)
    if average == "tasks":
        values = [sum(t) / len(t) for t in per_task]
    else:
        values = [v for t in per_task for v in t]
    return 100.0 * sum(values) / len(values)
