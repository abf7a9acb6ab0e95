"""Shared set-up of the test-time adaptation tests (Tinting, Surgery): two toy tasks, their fine-tuned
experts in a 4-bit store, heads and theta_0, built once per session and reused."""
from __future__ import annotations

import warnings

import pytest

from tvq_lightning.testing import make_tta_assets

TTA_TASKS = ("a", "b")
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return make_tta_assets(tmp_path_factory.getbasetemp() / "tta-assets", TTA_TASKS, steps=40, reuse=True)

