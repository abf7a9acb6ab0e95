"""Shared set-up of the demo tests (imported by name: pytest puts this folder on sys.path)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest


@contextlib.contextmanager
def isolated_cache(root: Path):
    """Point the embedded benchmark's data cache at ``root/cache`` (module-scoped fixtures cannot
    use the function-scoped ``monkeypatch``)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TVQ_CACHE_DIR", str(root / "cache"))
    try:
        yield
    finally:
        mp.undo()
