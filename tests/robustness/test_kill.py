"""SIGKILL at several points of quantize, add-task and merge (in a subprocess, killed from a hook:
see _killer.py), and a file-size limit (RLIMIT_FSIZE) as a disk that fills up: the old output is
intact, no half-written store is ever accepted, and the next run cleans up what the killed one left."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from _robust_helpers import assert_refused, tree_hash, Result
from tvq_lightning.store import TaskVectorStore
from tvq_lightning.store.io import stale_temps
from tvq_lightning.store.verify import verify_store

KILLER = Path(__file__).with_name("_killer.py")
ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}


def _run(hook: str, n: int, argv: list, fsize: int | None = None) -> Result:
    def limit():
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    p = subprocess.run([sys.executable, str(KILLER), hook, str(n), "--", *map(str, argv)], capture_output=True,
                       text=True, env=ENV, preexec_fn=limit, timeout=120)
    return Result(p.returncode, p.stdout, p.stderr)


def _quantize(w, out, *extra, tasks=("t0", "t1", "t2")):
    return ["quantize", "--pretrained", w.pre, "--finetuned", *w.ft_args(*tasks), "--out", out, "--quiet", *extra]


def _merge(w, out, method="task_arithmetic", *extra):
    return ["merge", "--pretrained", w.pre, "--store", w.store(), "--method", method, "--out", out, "--quiet", *extra]


def _killed(res: Result) -> None:
    assert res.rc == -signal.SIGKILL, (res.rc, res.err[-2000:])


def test_kill_while_creating_a_store(world, tvq):
    out = world.root / "s"
    _killed(_run("add_bytes", 10, _quantize(world, out)))
    assert not out.exists() and stale_temps(world.root, "s")       # a staging directory, never a store
    assert tvq(*_quantize(world, out)).rc == 0                     # the next run cleans it up
    assert not stale_temps(world.root, "s") and verify_store(out).ok


@pytest.mark.parametrize("hook", ["add_bytes", "swap", "after_swap"])
def test_kill_while_overwriting_a_store(world, tvq, hook):
    out = world.store("fp32")
    before = tree_hash(out)
    _killed(_run(hook, 1 if "swap" in hook else 8, _quantize(world, out, "--overwrite", "--scheme", "tvq", tasks=("t0",))))
    if hook == "after_swap":  # the new store is complete and in place; the old one is a stale leftover
        assert TaskVectorStore(out).tasks == ["t0"] and verify_store(out).ok
    else:
        assert tree_hash(out) == before
    assert tvq(*_quantize(world, out, "--overwrite", tasks=("t1",))).rc == 0
    assert not stale_temps(world.root) and TaskVectorStore(out).tasks == ["t1"]


@pytest.mark.parametrize("hook,n", [("add_bytes", 5), ("after_replace", 1), ("replace", 2)])
def test_kill_while_adding_a_task(world, tvq, hook, n):
    """Killed while writing the task file, after it is in place, or just before layout.json is
    replaced: the store is the old one (an unused file at most), and the task can be added again."""
    store = world.store()
    layout = (store / "layout.json").read_bytes()
    add = ["quantize", "--pretrained", world.pre, "--finetuned", f"t9={world.ft('t0')}", "--out", store, "--quiet"]
    _killed(_run(hook, n, add))
    assert (store / "layout.json").read_bytes() == layout and TaskVectorStore(store).tasks == ["t0", "t1", "t2"]
    report = verify_store(store)
    assert report.ok, report.format()
    assert tvq(*add).rc == 0
    assert TaskVectorStore(store).tasks[-1] == "t9" and not stale_temps(store / "tasks") and verify_store(store).ok


@pytest.mark.parametrize("method,hook", [("task_arithmetic", "add_bytes"), ("emr", "swap")])
def test_kill_while_overwriting_a_merge(world, tvq, method, hook):
    out = world.merged if method != "emr" else world.root / "emr"
    if method == "emr":
        assert tvq(*_merge(world, out, method)).rc == 0
    before = tree_hash(out) if out.is_dir() else out.read_bytes()
    extra = ["--overwrite"] + (["--scaling", "0.5"] if method != "emr" else [])
    _killed(_run(hook, 1 if hook == "swap" else 6, _merge(world, out, method, *extra)))
    assert (tree_hash(out) if out.is_dir() else out.read_bytes()) == before
    assert stale_temps(world.root)
    assert tvq(*_merge(world, out, method, "--overwrite")).rc == 0
    assert not stale_temps(world.root)


@pytest.mark.parametrize("command", ["quantize", "merge"])
def test_file_size_limit_is_one_line_and_leaves_nothing(world, command):
    before = tree_hash(world.root)
    argv = _quantize(world, world.root / "s", "--scheme", "fp32") if command == "quantize" else _merge(world, world.root / "m.safetensors")
    res = _run("none", 0, argv, fsize=16 << 10)
    assert_refused(res, "File too large", "ulimit")
    assert tree_hash(world.root) == before
