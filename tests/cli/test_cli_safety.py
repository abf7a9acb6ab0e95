"""What the CLI protects: outputs it did not write (export --overwrite), and the store's checksums
(``tvq inspect --verify / --upgrade``, ``tvq merge --no-verify``)."""
from __future__ import annotations

from test_cli import assert_one_line_error, quantize

from tvq_lightning.store import load_state_dict


def test_inspect_verify_and_upgrade(tmp_path, tvq, ckpts):
    import json

    out = tmp_path / "store"
    assert quantize(tvq, ckpts, out).rc == 0
    res = tvq("inspect", out, "--verify")
    assert res.rc == 0 and ": OK;" in res.out, res.out
    assert tvq("inspect", out, "--verify", "--pretrained", ckpts.pre).rc == 0
    # a flipped bit in a task file's data is found, named, exit 2
    task = next((out / "tasks").glob("*.safetensors"))
    raw = bytearray(task.read_bytes())
    raw[-3] ^= 0x10
    task.write_bytes(bytes(raw))
    assert_one_line_error(tvq("inspect", out, "--verify"), task.name)
    assert_one_line_error(tvq("merge", "--pretrained", ckpts.pre, "--store", out, "--method", "task_arithmetic",
                              "--out", tmp_path / "m.safetensors", "--quiet"), task.name)
    # --no-verify trusts the store (the damage is then not detected)
    assert tvq("merge", "--pretrained", ckpts.pre, "--store", out, "--method", "task_arithmetic",
               "--out", tmp_path / "m.safetensors", "--quiet", "--no-verify").rc == 0
    # a version-1 layout (no checksums) reads unverified, and --upgrade records them
    fresh = tmp_path / "fresh"
    assert quantize(tvq, ckpts, fresh).rc == 0
    lay = json.loads((fresh / "layout.json").read_text())
    lay["version"] = 1
    lay.pop("layout_crc32", None)
    for entry in [*lay["tasks"].values(), *([lay["base"]] if lay.get("base") else [])]:
        entry.pop("crc32", None)
    (fresh / "layout.json").write_text(json.dumps(lay))
    res = tvq("inspect", fresh, "--verify")
    assert res.rc == 0 and "--upgrade" in res.out, res.out
    res = tvq("inspect", fresh, "--upgrade", "--verify")
    assert res.rc == 0 and "checksums recorded" in res.out and "without checksums" in res.out, res.out
    assert json.loads((fresh / "layout.json").read_text())["version"] == 2


def test_export_refuses_existing_output_without_overwrite(tmp_path, tvq, ckpts, snap):
    out = tmp_path / "store"
    assert quantize(tvq, ckpts, out).rc == 0
    dest = tmp_path / "tau.safetensors"
    dest.write_bytes(b"precious")
    before = snap(tmp_path)
    res = tvq("export", "--store", out, "--task", "t0", "--out", dest)
    assert_one_line_error(res, "tau.safetensors", "left untouched")   # a user's file: never suggests --overwrite
    assert "--overwrite" not in res.err
    assert snap(tmp_path) == before
    res = tvq("export", "--store", out, "--task", "t0", "--out", dest, "--overwrite")   # not tvq's file: refused
    assert_one_line_error(res, "tau.safetensors", "left untouched")
    assert snap(tmp_path) == before
    dest.unlink()
    assert tvq("export", "--store", out, "--task", "t0", "--out", dest).rc == 0
    res = tvq("export", "--store", out, "--task", "t0", "--out", dest, "--overwrite")   # its own: replaced
    assert res.rc == 0, res.err
    assert set(load_state_dict(dest)) == set(ckpts.pre_sd)
    assert_one_line_error(tvq("export", "--store", out, "--task", "nope", "--out", tmp_path / "n.safetensors"), "'nope'")
    assert_one_line_error(tvq("export", "--store", out, "--task", "t0", "--out", tmp_path / "no" / "dir.safetensors"), "no")
