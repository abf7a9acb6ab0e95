"""Wall time per phase of a demo run (``report.json["timings"]``)."""
from __future__ import annotations

import time


class PhaseTimer:
    """``lap(phase)`` records the seconds since the previous lap (or the start) under ``phase``;
    ``finish()`` adds ``"total"``. ``timings`` is the dict the report stores."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._start = self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.timings[phase] = now - self._last
        self._last = now

    def finish(self) -> dict[str, float]:
        self.timings["total"] = time.perf_counter() - self._start
        return self.timings
