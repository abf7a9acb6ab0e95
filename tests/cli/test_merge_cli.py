"""`tvq merge` end to end: every registered method through the CLI, per-task artifacts, errors."""
from __future__ import annotations

import pytest
import torch

from tvq_lightning.merging.engine import merge_state_dict
from tvq_lightning.merging.registry import list_mergers
from tvq_lightning.store.checkpoints import load_state_dict


@pytest.fixture
def store(ckpts, tvq, tmp_path):
    out = tmp_path / "store"
    r = tvq("quantize", "--pretrained", ckpts.pre, "--finetuned", *ckpts.finetuned_args(), "--scheme", "tvq",
            "--bits", "4", "--out", out, "--quiet")
    assert r.rc == 0, r.err
    return out


@pytest.mark.parametrize("method", list_mergers(per_task=False))
def test_every_single_model_method(method, ckpts, store, tvq, tmp_path):
    out = tmp_path / "merged.safetensors"
    r = tvq("merge", "--pretrained", ckpts.pre, "--store", store, "--method", method, "--out", out, "--quiet")
    assert r.rc == 0, r.err
    merged = load_state_dict(out)
    assert set(merged) == set(ckpts.pre_sd)
    expected = merge_state_dict(store, ckpts.pre_sd, method)
    for k, v in expected.items():
        assert torch.equal(merged[k], v), k
        assert merged[k].dtype == ckpts.pre_sd[k].dtype


@pytest.mark.parametrize("method", list_mergers(per_task=True))
def test_every_per_task_method(method, ckpts, store, tvq, tmp_path):
    out = tmp_path / "artifact"
    r = tvq("merge", "--pretrained", ckpts.pre, "--store", store, "--method", method, "--out", out, "--quiet")
    assert r.rc == 0, r.err
    r = tvq("inspect", out)
    assert r.rc == 0 and "per-task merge" in r.out
    r = tvq("inspect", out, "--json")
    assert r.rc == 0 and '"scales"' in r.out
    for task in ckpts.fts:
        model = tmp_path / f"{task}.safetensors"
        r = tvq("export", "--store", out, "--task", task, "--pretrained", ckpts.pre, "--out", model)
        assert r.rc == 0, r.err
        sd = load_state_dict(model)
        assert set(sd) == set(ckpts.pre_sd)
        assert any(not torch.equal(sd[k], ckpts.pre_sd[k]) for k in sd)
    # a per-task method cannot write a single .safetensors
    r = tvq("merge", "--pretrained", ckpts.pre, "--store", store, "--method", method, "--out", tmp_path / "x.safetensors")
    assert r.rc == 2 and "directory" in r.err


def test_method_options_and_scaling(ckpts, store, tvq, tmp_path):
    out = tmp_path / "ta.safetensors"
    assert tvq("merge", "--pretrained", ckpts.pre, "--store", store, "--method", "task_arithmetic", "--scaling", "0",
               "--out", out, "--quiet").rc == 0
    merged = load_state_dict(out)
    for k, v in ckpts.pre_sd.items():
        assert torch.equal(merged[k], v)  # lambda = 0 gives theta_0
    out2 = tmp_path / "ties.safetensors"
    assert tvq("merge", "--pretrained", ckpts.pre, "--store", store, "--method", "ties", "--k", "0.1", "--merge",
               "dis-mean", "--tasks", "t0", "t1", "--out", out2, "--quiet").rc == 0
    ref = merge_state_dict(store, ckpts.pre_sd, "ties", tasks=["t0", "t1"], k=0.1, merge="dis-mean")
    got = load_state_dict(out2)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def _one_error_line(r):
    assert r.rc == 2, (r.rc, r.out, r.err)
    lines = [ln for ln in r.err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("tvq: error:"), r.err
    assert "Traceback" not in r.err
    return lines[0]


def test_errors(ckpts, store, tvq, tmp_path):
    out = tmp_path / "m.safetensors"
    base = ["merge", "--pretrained", ckpts.pre, "--store", store, "--out", out]
    assert "did you mean 'ties'" in _one_error_line(tvq(*base, "--method", "tie"))
    line = _one_error_line(tvq(*base, "--method", "task_arithmetic", "--k", "0.2"))
    assert "no option --k" in line and "--scaling" in line
    assert "--merge" in _one_error_line(tvq(*base, "--method", "ties", "--merge", "sum"))
    assert "expects float" in _one_error_line(tvq(*base, "--method", "ties", "--scaling", "abc"))
    # a store made from other pre-trained weights
    line = _one_error_line(tvq("merge", "--pretrained", ckpts.fts["t0"], "--store", store, "--method", "ties", "--out", out))
    assert "not the weights store" in line
    assert not out.exists()
    # unknown task
    assert "no task 'zzz'" in _one_error_line(tvq(*base, "--method", "ties", "--tasks", "zzz"))
    # output exists
    out.write_bytes(b"keep me")
    assert "already exists" in _one_error_line(tvq(*base, "--method", "ties"))
    assert out.read_bytes() == b"keep me"
    # --overwrite replaces only a file tvq wrote: a user's file is refused and left alone
    line = _one_error_line(tvq(*base, "--method", "ties", "--overwrite", "--quiet"))
    assert "left untouched" in line and "--overwrite" not in line
    assert out.read_bytes() == b"keep me"
    out.unlink()
    assert tvq(*base, "--method", "ties", "--quiet").rc == 0
    assert tvq(*base, "--method", "ties", "--overwrite", "--quiet").rc == 0     # its own output: replaced
    assert len(load_state_dict(out)) == len(ckpts.pre_sd)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
