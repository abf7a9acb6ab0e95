"""The Python API under bad input and damaged stores: checksums, layout checks against theta_0,
option validation, operating-system errors, safe overwrite, stale temporary files, the umask."""
from __future__ import annotations

import errno
import json
import math
import os
import stat

import pytest
import torch

from _damage import edit_layout, flip_tensor, task_file
from _robust_helpers import tree_hash
from tvq_lightning.errors import (IncompatibleWeights, IntegrityError, OptionError, OutputError, OutputExistsError,
                                  StoreError, TvqError)
from tvq_lightning.merging import create_merger, merge_state_dict, plan_merge, write_merged, write_per_task
from tvq_lightning.store import TaskVectorStore, load_state_dict, quantize_to_store
from tvq_lightning.store import io as io_mod
from tvq_lightning.store.verify import upgrade_store, verify_store

KEY = "blocks.0.linear1.weight"


def _refused(exc, fn, root, match=None):
    before = tree_hash(root)
    with pytest.raises(exc, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    assert tree_hash(root) == before
    return str(info.value)


# ------------------------------------------------------------------ integrity


def test_bit_flip_in_codes_is_caught_lazily_and_skippable(world):
    flip_tensor(task_file(world.store(), "t1"), KEY + "#q", 2)
    store = TaskVectorStore(world.store())
    store.task_vector("t0", KEY)                   # other tasks still read
    store.task_vector("t1", "proj")                # other tensors of the damaged file too
    with pytest.raises(IntegrityError, match=f"{KEY}#q"):
        store.task_vector("t1", KEY)
    TaskVectorStore(world.store(), verify=False).task_vector("t1", KEY)   # trusted: no check
    report = verify_store(world.store())
    assert not report.ok and len(report.problems) == 1 and KEY in report.problems[0]
    with pytest.raises(IntegrityError):
        report.raise_if_bad()


def test_verify_store_reports(world):
    report = verify_store(world.store("rtvq"))
    assert report.ok and report.version == 2 and report.files == 4 and report.verified_tensors > 20, report.format()
    task_file(world.store(), "t2").unlink()
    (world.store() / "tasks" / ".t9.g1.safetensors.999999999.abcdefgh.part").write_bytes(b"x")
    (world.store() / "tasks" / "orphan.g1.safetensors").write_bytes(b"x")
    report = verify_store(world.store())
    assert not report.ok and "t2.g1" in report.problems[0]
    assert any("orphan" in n for n in report.notes) and any(".part" in n for n in report.notes)
    assert json.loads(json.dumps(report.to_json()))["ok"] is False
    assert not verify_store(world.root / "nowhere").ok


def test_version_1_store_is_read_unverified_and_upgraded(world):
    def as_v1(d):
        d["version"] = 1
        d.pop("layout_crc32")
        for t in [*d["tasks"].values(), d["base"]] if d["base"] else d["tasks"].values():
            t.pop("crc32")

    store = world.store("rtvq")
    edit_layout(store, as_v1, reseal=False)
    want = TaskVectorStore(world.store("rtvq")).task_vector("t1", KEY)
    report = verify_store(store)
    assert report.ok and report.unverified_files == 4 and "--upgrade" in report.notes[0]
    flip_tensor(task_file(store, "t1"), "proj#q", 0)
    TaskVectorStore(store).task_vector("t1", "proj")       # version 1: no checksums, not verified
    flip_tensor(task_file(store, "t1"), "proj#q", 0)       # restore, then upgrade
    layout = upgrade_store(store)
    assert layout.verifiable and json.loads((store / "layout.json").read_text())["version"] == 2
    assert verify_store(store).ok and torch.equal(TaskVectorStore(store).task_vector("t1", KEY), want)
    flip_tensor(task_file(store, "t1"), "proj#q", 0)
    with pytest.raises(IntegrityError):
        TaskVectorStore(store).task_vector("t1", "proj")


def test_layout_shapes_checked_against_pretrained_before_allocation(world, monkeypatch):
    edit_layout(world.store(), lambda d: d["keys"][KEY].__setitem__("shape", [1 << 20, 1 << 14]))  # 64 GiB as fp32
    calls = []
    real_zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: calls.append(a) or real_zeros(*a, **k))
    msg = _refused(StoreError, lambda: plan_merge(world.store(), world.pre, "ties"), world.root, KEY)
    assert "theta_0 has float32[64, 16]" in msg and not calls


def test_layout_that_lost_a_key_is_refused(world):
    edit_layout(world.store(), lambda d: d["keys"].pop(KEY))
    _refused(StoreError, lambda: merge_state_dict(world.store(), load_state_dict(world.pre), "task_arithmetic"),
             world.root, "no entry for theta_0's key")


# ------------------------------------------------------------------ API options


@pytest.mark.parametrize("method,opts", [("task_arithmetic", {"scaling": math.nan}), ("task_arithmetic", {"scaling": math.inf}),
                                         ("ties", {"scaling": -math.inf}), ("consensus", {"lambdas": (0.4, math.nan)}),
                                         ("lines", {"alpha": math.nan}), ("dare", {"scaling": math.nan}),
                                         ("ties", {"k": math.nan}), ("magmax", {"scaling": math.inf})])
def test_non_finite_options_refused(world, method, opts):
    _refused(OptionError, lambda: create_merger(method, **opts), world.root, "finite|must")
    _refused(TvqError, lambda: plan_merge(world.store(), world.pre, method, **opts), world.root)


def test_non_finite_config_of_a_merger_instance(world):
    m = create_merger("task_arithmetic")
    object.__setattr__(m.config, "scaling", math.nan)
    _refused(OptionError, lambda: plan_merge(world.store(), world.pre, m), world.root, "scaling")


@pytest.mark.parametrize("tasks", [["t0", "t0"], "t0", ["t1", "t2", "t1"]])
def test_duplicate_tasks_refused(world, tasks):
    _refused(OptionError, lambda: merge_state_dict(world.store(), load_state_dict(world.pre), "task_arithmetic", tasks=tasks),
             world.root)


@pytest.mark.parametrize("bad", [{"proj": 3}, {"proj": [1.0, 2.0]}, {1: torch.ones(2)}, "not-a-dict-but-a-missing-path", 42])
def test_non_tensor_state_dict_values(world, bad):
    pre = bad if not isinstance(bad, dict) else {**load_state_dict(world.pre), **bad}
    _refused(TvqError, lambda: merge_state_dict(world.store(), pre, "task_arithmetic"), world.root)
    _refused(TvqError, lambda: quantize_to_store(pre, {"a": world.ft("t0")}, world.root / "s", progress=False), world.root)


def test_int32_finetuned_key_is_named_with_its_dtype(world):
    ft = {k: (v.to(torch.int32) if k == "proj" else v) for k, v in load_state_dict(world.ft("t0")).items()}
    _refused(IncompatibleWeights, lambda: quantize_to_store(world.pre, {"a": ft}, world.root / "s", progress=False),
             world.root, "'proj' has dtype int32")


# ------------------------------------------------------------------ operating-system errors


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EIO])
@pytest.mark.parametrize("what", ["quantize", "merge", "emr", "export"])
def test_os_errors_become_one_line(world, monkeypatch, code, what):
    """A write failing half-way (disk full, ...) is one line naming the path; nothing is left behind."""
    real = os.pwrite

    def failing(fd, data, offset):
        if offset > 64:
            raise OSError(code, os.strerror(code))
        return real(fd, data, offset)

    monkeypatch.setattr(io_mod.os, "pwrite", failing)
    run = {"quantize": lambda: quantize_to_store(world.pre, {"a": world.ft("t0")}, world.root / "s", progress=False),
           "merge": lambda: write_merged(plan_merge(world.store(), world.pre, "ties"), world.root / "m.safetensors"),
           "emr": lambda: write_per_task(plan_merge(world.store(), world.pre, "emr"), world.root / "e"),
           "export": lambda: __import__("tvq_lightning.store.export", fromlist=["x"]).export_task(
               world.store(), "t0", world.root / "x.safetensors")}[what]
    msg = _refused(OutputError, run, world.root)
    assert os.strerror(code) in msg and str(world.root) in msg


def test_unwritable_parent_is_refused_up_front(world, monkeypatch):
    monkeypatch.setattr(io_mod.os, "access", lambda p, mode: False)
    _refused(OutputError, lambda: quantize_to_store(world.pre, {"a": world.ft("t0")}, world.root / "s", progress=False),
             world.root, "permission denied")


# ------------------------------------------------------------------ overwrite, leftovers, umask


def test_overwrite_replaces_only_what_tvq_wrote(world):
    quantize_to_store(world.pre, {"a": world.ft("t0")}, world.store(), overwrite=True, progress=False)
    assert TaskVectorStore(world.store()).tasks == ["a"]
    write_merged(plan_merge(world.store(), world.pre, "ties"), world.merged, overwrite=True)
    write_per_task(plan_merge(world.store(), world.pre, "emr"), world.root / "e")
    write_per_task(plan_merge(world.store(), world.pre, "tall"), world.root / "e", overwrite=True)
    assert json.loads((world.root / "e" / "merge.json").read_text())["method"] == "tall"
    (world.root / "e" / "merge.json").write_text('{"format": "mine"}')
    _refused(OutputExistsError, lambda: write_per_task(plan_merge(world.store(), world.pre, "emr"), world.root / "e",
                                                       overwrite=True), world.root, "not a per-task")


def test_stale_temporaries_are_cleaned_only_when_their_process_is_gone(world):
    dead, live = 999999999, os.getppid()
    tasks = world.store() / "tasks"
    stale = [tasks / f".t9.g1.safetensors.{dead}.abcdefgh.part", world.store() / f".layout.json.{dead}.abcdefgh.tmp",
             world.root / f".s.{dead}.abcdefgh.staging"]
    keep = [tasks / f".t8.g1.safetensors.{live}.abcdefgh.part", tasks / ".user.notes.part", tasks / "notes.txt"]
    for p in stale[:2] + keep:
        p.write_bytes(b"x")
    stale[2].mkdir()
    (stale[2] / "layout.json").write_text("{}")
    quantize_to_store(world.pre, {"t9": world.ft("t0")}, world.store(), progress=False)     # a successful add
    quantize_to_store(world.pre, {"a": world.ft("t0")}, world.root / "s", progress=False)   # a new store
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_new_outputs_respect_the_umask(world, umask):
    old = os.umask(umask)
    try:
        quantize_to_store(world.pre, {"a": world.ft("t0")}, world.root / "s", progress=False)
        write_merged(plan_merge(world.root / "s", world.pre, "ties"), world.root / "m2.safetensors")
    finally:
        os.umask(old)
    for p in [world.root / "s", world.root / "s" / "tasks"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o777 & ~umask
    for p in [world.root / "s" / "layout.json", world.root / "s" / "tasks" / "a.g1.safetensors", world.root / "m2.safetensors"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p
