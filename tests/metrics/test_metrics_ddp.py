"""Two CPU processes (gloo) give the same compute() as one process on the union of their data."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _ddp_metrics_script import batches, evaluate, shards  # noqa: E402

SCRIPT = Path(__file__).with_name("_ddp_metrics_script.py")


@pytest.mark.slow
def test_two_processes_equal_one_on_the_union(tmp_path):
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(r), str(tmp_path)], cwd=SCRIPT.parent,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    union = {k: [*batches(shards()[0], 0)[k], *batches(shards()[1], 1)[k]] for k in ("seg", "depth", "normal")}
    want = evaluate(union)
    for got in ranks:
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-6), k
