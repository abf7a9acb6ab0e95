"""Shared set-up of the data tests: every test generates into its own empty cache directory."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", ".*does not have many workers.*")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """``$TVQ_CACHE_DIR`` pointed at a fresh temporary folder; returns the embedded cache folder in it."""
    monkeypatch.setenv("TVQ_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "embedded"
