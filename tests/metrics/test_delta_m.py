"""delta_m: signs per direction, which metrics count, per-task averaging, task types as directions, errors."""
from __future__ import annotations

import pytest

from tvq_lightning.errors import TvqError
from tvq_lightning.metrics import delta_m

BASE = {"seg": {"miou": 0.50, "pixel_acc": 0.80}, "depth": {"abs_err": 0.40, "rel_err": 0.20},
        "normal": {"mean_angle": 20.0, "median_angle": 15.0, "within_11_25": 0.30, "within_22_5": 0.6,
                   "within_30": 0.7}}
MODEL = {"seg": {"miou": 0.45, "pixel_acc": 0.84}, "depth": {"abs_err": 0.44, "rel_err": 0.19},
         "normal": {"mean_angle": 22.0, "median_angle": 15.0, "within_11_25": 0.27, "within_22_5": 0.6,
                    "within_30": 0.7}}
TYPES = {"seg": "segmentation", "depth": "depth", "normal": "normal"}


def test_signs_and_the_default_every_metric_of_the_task_type():
    terms = [-0.10, 0.05, -0.10, 0.05, -0.10, 0.0, -0.10, 0.0, 0.0]   # + higher-, - lower-is-better
    assert delta_m(MODEL, BASE, TYPES) == pytest.approx(100 * sum(terms) / len(terms))
    assert delta_m(BASE, BASE, TYPES) == 0


def test_metric_subsets_mappings_and_per_task_averaging():
    chosen = {"seg": ["miou", "pixel_acc"], "depth": ["abs_err", "rel_err"], "normal": ["mean_angle", "within_11_25"]}
    assert delta_m(MODEL, BASE, TYPES, metrics=chosen) == pytest.approx(100 * (-0.10 + 0.05 - 0.10 + 0.05 - 0.10 - 0.10) / 6)
    directions = {"seg": {"miou": True}, "depth": {"abs_err": False, "rel_err": False}}
    assert delta_m(MODEL, BASE, directions) == pytest.approx(100 * (-0.10 - 0.10 + 0.05) / 3)
    assert delta_m(MODEL, BASE, directions, average="tasks") == pytest.approx(100 * (-0.10 + (-0.10 + 0.05) / 2) / 2)


def test_errors():
    with pytest.raises(TvqError, match="no direction"):
        delta_m(MODEL, BASE, TYPES, metrics={"seg": ["acc"]})
    with pytest.raises(TvqError, match="missing"):
        delta_m({"seg": {"miou": 0.4}}, BASE, {"seg": "segmentation"})
    with pytest.raises(TvqError, match="is 0"):
        delta_m(MODEL, {"seg": {"miou": 0.0}}, {"seg": {"miou": True}})
    with pytest.raises(TvqError, match="average"):
        delta_m(MODEL, BASE, TYPES, average="mean")
    with pytest.raises(TvqError, match="unknown task type"):
        delta_m(MODEL, BASE, {"seg": "segmentatoin"})
