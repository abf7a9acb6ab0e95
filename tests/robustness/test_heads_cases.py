"""``tvq heads`` refuses bad input with one line and leaves the output directory untouched.

The shipped tiny CLIP is the model (no download, no open_clip weights to write); custom tasks use
words of its vocabulary.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _robust_helpers import assert_refused, run_tvq, tree_hash

pytest.importorskip("open_clip")  # the tiny CLIP's text tower is open_clip's TextTransformer

GOOD = {"classnames": ["circle", "square", "triangle"], "templates": ["a {}", "a large {}"]}


def _task(root: Path, doc, name: str = "task.json") -> Path:
    p = root / name
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return p


def _heads(capfd, out: Path, *tasks, extra: tuple = ()):
    return run_tvq(capfd, ["heads", "--source", "tiny_clip", "--out", out, "--tasks", *tasks, "--quiet", *extra])


@pytest.fixture
def built(tmp_path, capfd) -> Path:
    """An output directory with one good head in it."""
    out = tmp_path / "heads"
    res = _heads(capfd, out, _task(tmp_path, GOOD, "shapes.json"))
    assert res.rc == 0, res.err
    return out


@pytest.mark.parametrize("doc,fragments", [
    ({"classnames": ["circle", "square"], "templates": ["a photo"]}, ("templates[0] 'a photo' has no '{}'",)),
    ({"classnames": ["circle"], "templates": ["a {} of {}"]}, ("templates[0]", "exactly one '{}'")),
    ({"classnames": ["circle"], "templates": ["a {x}"]}, ("templates[0]", "exactly one '{}'")),
    ({"classnames": ["circle"], "templates": ["a {"]}, ("templates[0]", "not a format string")),
    ({"classnames": [], "templates": ["a {}"]}, ("'classnames' must be a non-empty list",)),
    ({"templates": ["a {}"]}, ("'classnames' must be a non-empty list",)),
    ({"classnames": ["circle", "circle"]}, ("classnames[1] 'circle' repeats classnames[0]",)),
    ({"classnames": ["circle", ""]}, ("classnames[1] must be a non-empty string",)),
    ({"classnames": ["circle"], "templates": "a {}"}, ("'templates' must be a non-empty list",)),
    ({"classnames": ["circle"], "template": ["a {}"]}, ("unknown key 'template'", "did you mean 'templates'?")),
    ('{"classnames": ["circle",', ("not valid JSON (line 1",)),
    ("[1, 2]", ("a task is a JSON object",)),
])
def test_bad_custom_task_json(built, tmp_path, capfd, doc, fragments):
    spec = _task(tmp_path, doc, "bad.json")
    before = tree_hash(built)
    line = assert_refused(_heads(capfd, built, spec), "--tasks:", str(spec), *fragments)
    assert tree_hash(built) == before, line


def test_missing_custom_task_file(built, tmp_path, capfd):
    before = tree_hash(built)
    assert_refused(_heads(capfd, built, tmp_path / "nope.json"), "nope.json: no such task file")
    assert tree_hash(built) == before


def test_unknown_task(built, capfd):
    before = tree_hash(built)
    assert_refused(_heads(capfd, built, "EuroSat", "Flowrs102"), "unknown task 'Flowrs102'",
                   "did you mean Flowers102?")
    assert_refused(_heads(capfd, built, "nothing-like-it"), "unknown task 'nothing-like-it'", "the catalog has SUN397")
    assert tree_hash(built) == before


def test_out_is_a_file(tmp_path, capfd):
    out = _task(tmp_path, "not a directory", "heads")
    assert_refused(_heads(capfd, out, _task(tmp_path, GOOD)), f"--out {out} is a file", "choose another --out")
    assert out.read_text() == "not a directory"


def test_out_parent_is_a_file(tmp_path, capfd):
    parent = _task(tmp_path, "x", "file")
    assert_refused(_heads(capfd, parent / "heads", _task(tmp_path, GOOD)), f"{parent} is a file",
                   "choose another --out")


def test_foreign_or_damaged_head_file_is_not_replaced(built, tmp_path, capfd):
    spec = _task(tmp_path, GOOD, "shapes.json")
    head = built / "shapes.safetensors"
    for content in (b"my own notes", b""):
        head.write_bytes(content)
        before = tree_hash(built)
        assert_refused(_heads(capfd, built, spec), f"{head} exists and was not written by tvq heads",
                       "pass --overwrite")
        assert tree_hash(built) == before
    assert _heads(capfd, built, spec, extra=("--overwrite",)).rc == 0
    assert head.stat().st_size > 100


def test_head_path_is_a_directory(built, tmp_path, capfd):
    (built / "other.safetensors").mkdir()
    spec = _task(tmp_path, GOOD, "other.json")
    assert_refused(_heads(capfd, built, spec), "other.safetensors exists and is not a file")


def test_two_tasks_one_file_and_bad_names(built, tmp_path, capfd):
    a = _task(tmp_path, GOOD, "a.json")
    b = _task(tmp_path, {**GOOD, "templates": ["one {}"]}, "b.json")
    before = tree_hash(built)
    assert_refused(_heads(capfd, built, f"x={a}", f"x={b}"), "two different tasks would be written to x.safetensors")
    assert_refused(_heads(capfd, built, f"={a}"), "write NAME=TASK")
    assert_refused(_heads(capfd, built, f"a b={a}"), "not usable as a file name")
    assert tree_hash(built) == before


def test_bad_model_options(tmp_path, capfd):
    spec, out = _task(tmp_path, GOOD), tmp_path / "heads"
    assert_refused(run_tvq(capfd, ["heads", "--out", out, "--tasks", spec, "--model", "ViT-B-32", "--pretrained",
                                   tmp_path / "missing.safetensors"]), "no such weights file")
    assert_refused(run_tvq(capfd, ["heads", "--out", out, "--tasks", spec, "--pretrained", "openai"]),
                   "--model is required")
    assert_refused(run_tvq(capfd, ["heads", "--out", out, "--tasks", spec, "--model", "ViT-B-32", "--pretrained",
                                   "nonsense"]), "--pretrained 'nonsense': neither a file nor an open_clip tag",
                   "openai")
    assert_refused(run_tvq(capfd, ["heads", "--out", out, "--tasks", spec, "--model", "ViT-Q-99", "--pretrained",
                                   "openai"]), "--model 'ViT-Q-99': open_clip has no such model")
    assert_refused(run_tvq(capfd, ["heads", "--out", out, "--tasks", spec, "--source", "tiny_clip", "--pretrained",
                                   tmp_path]), "not a tiny CLIP directory")
    assert_refused(run_tvq(capfd, ["heads", "--out", out, "--tasks", spec, "--source", "hf_clip"]),
                   "--pretrained is required with --source hf_clip")
    assert_refused(run_tvq(capfd, ["heads", "--out", out, "--tasks", spec, "--source", "hf_clip", "--pretrained",
                                   tmp_path / "no-such-folder"]), "--pretrained:", "no-such-folder")
    assert_refused(_heads(capfd, out, spec, extra=("--device", "tpu:9")), "--device")
    assert_refused(run_tvq(capfd, ["heads", "--out", out, "--tasks", spec, "--source", "nope"]),
                   "--source 'nope': choose one of open_clip, tiny_clip, hf_clip")
    assert not out.exists()


def test_open_clip_weights_of_another_model(tmp_path, capfd):
    import open_clip
    import torch
    from safetensors.torch import save_file

    cfg = tmp_path / "tvq-heads-robust.json"
    cfg.write_text(json.dumps({"embed_dim": 8, "vision_cfg": {"image_size": 32, "layers": 1, "width": 16,
                                                              "patch_size": 16, "head_width": 16},
                               "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2,
                                            "layers": 1}}))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, wrong)
    out = tmp_path / "heads"
    line = assert_refused(run_tvq(capfd, ["heads", "--out", out, "--tasks", "PCAM", "--model", "tvq-heads-robust",
                                          "--pretrained", wrong, "--openclip-config", cfg, "--quiet"]),
                          f"--pretrained {wrong}: not weights of open_clip tvq-heads-robust")
    assert len(line) < 400
    assert not out.exists()  # the model is loaded before the directory is made
    assert "tvq-heads-robust" in open_clip.list_models()
