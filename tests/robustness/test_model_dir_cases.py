"""Bad Hugging Face model folders: each refused with one CheckpointError line that names the folder
or file and the fix, and nothing under the folder changed. The folders are written by hand (no
transformers needed): a CLIP vision tower's keys in shards with a JSON index."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tvq_lightning.errors import CheckpointError, TvqError
from tvq_lightning.store.model_dir import WEIGHT_FILES, open_model_dir
from tvq_lightning.store.st_stream import save_safetensors

from _robust_helpers import tree_hash

KEYS = {"vision_model.embeddings.class_embedding": (8,), "vision_model.pre_layrnorm.weight": (8,),
        "vision_model.encoder.layers.0.mlp.fc1.weight": (16, 8), "vision_model.post_layernorm.bias": (8,)}
CONFIG = {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model"}


def _tensors(keys=KEYS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=g) for k, shape in keys.items()}


def write_sharded(root: Path, shards: dict[str, list[str]], weight_map: dict[str, str] | str | None = None,
                  config: dict | None = CONFIG) -> Path:
    """``root`` with safetensors ``shards`` (name -> keys) and an index (default: the true map)."""
    root.mkdir(parents=True, exist_ok=True)
    tensors = _tensors()
    for name, keys in shards.items():
        save_safetensors({k: tensors[k] for k in keys}, root / name)
    if weight_map is None:
        weight_map = {k: n for n, keys in shards.items() for k in keys}
    text = weight_map if isinstance(weight_map, str) else json.dumps({"metadata": {}, "weight_map": weight_map})
    (root / "model.safetensors.index.json").write_text(text)
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    return root


HALVES = {"model-00001-of-00002.safetensors": list(KEYS)[:2], "model-00002-of-00002.safetensors": list(KEYS)[2:]}


def refused(root: Path, *words, **kw) -> str:
    """Open ``root``: it must fail with one line holding ``words`` and leave the folder as it was."""
    before = tree_hash(root) if root.is_dir() else None
    with pytest.raises(CheckpointError) as e:
        open_model_dir(root, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert str(w) in msg, (w, msg)
    if before is not None:
        assert tree_hash(root) == before
    return msg


def test_good_sharded_folder_opens(tmp_path):
    with open_model_dir(write_sharded(tmp_path / "m", HALVES)) as sd:
        assert sorted(sd) == sorted(k.removeprefix("vision_model.") for k in KEYS)
        want = _tensors()
        assert all(torch.equal(sd[k], want["vision_model." + k]) for k in sd)


def test_folder_without_weights(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    refused(d, d, "holds no weights", *WEIGHT_FILES)
    (d / "snapshots").mkdir()
    refused(d, "snapshots/<revision>")
    (d / "tf_model.h5").write_bytes(b"x")
    refused(d, "tf_model.h5", "open that file directly")
    refused(tmp_path / "nowhere", tmp_path / "nowhere", "does not exist")
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x")
    refused(f, "is a file", "open_checkpoint")


@pytest.mark.parametrize("bad", ["../x.safetensors", "/tmp/x.safetensors", "sub/../../x.safetensors",
                                 "..\\x.safetensors", "C:/x.safetensors", ""])
def test_shard_outside_the_folder(tmp_path, bad):
    outside = tmp_path / "x.safetensors"
    save_safetensors(_tensors(), outside)  # exists: refused on the name, not because it is missing
    wmap = {k: "model-00001-of-00002.safetensors" for k in HALVES["model-00001-of-00002.safetensors"]}
    wmap.update({k: bad for k in HALVES["model-00002-of-00002.safetensors"]})
    d = write_sharded(tmp_path / "m", HALVES, wmap)
    refused(d, "model.safetensors.index.json", repr(bad), "not a file inside", "re-download")


def test_key_in_two_shards(tmp_path):
    k = list(KEYS)[0]
    shards = {"a.safetensors": list(KEYS)[:2], "b.safetensors": [k, *list(KEYS)[2:]]}
    wmap = {**{x: "a.safetensors" for x in list(KEYS)[:2]}, **{x: "b.safetensors" for x in list(KEYS)[2:]}}
    refused(write_sharded(tmp_path / "m", shards, wmap), repr(k), "in both a.safetensors and b.safetensors")


def test_key_listed_twice_in_the_index(tmp_path):
    k = list(KEYS)[0]
    body = ", ".join(f'"{x}": "{n}"' for n, keys in HALVES.items() for x in keys)
    text = '{"weight_map": {' + body + f', "{k}": "model-00002-of-00002.safetensors"' + "}}"
    refused(write_sharded(tmp_path / "m", HALVES, text), repr(k), "appears twice", "exactly one shard")


def test_missing_shard(tmp_path):
    d = write_sharded(tmp_path / "m", HALVES)
    (d / "model-00002-of-00002.safetensors").unlink()
    refused(d, "model-00002-of-00002.safetensors", "is missing", "download the model again")


def test_index_and_shards_disagree(tmp_path):
    k = list(KEYS)[-1]
    wmap = {x: n for n, keys in HALVES.items() for x in keys}
    moved = {**wmap, k: "model-00001-of-00002.safetensors"}
    refused(write_sharded(tmp_path / "a", HALVES, moved), repr(k), "the index puts it in")
    unlisted = {x: n for x, n in wmap.items() if x != k}
    refused(write_sharded(tmp_path / "b", HALVES, unlisted), repr(k), "does not list it")
    extra = {**wmap, "vision_model.ghost": "model-00001-of-00002.safetensors"}
    refused(write_sharded(tmp_path / "c", HALVES, extra), "'vision_model.ghost'", "does not hold it")


@pytest.mark.parametrize("text", ["{not json", "[]", '{"weight_map": {}}', '{"metadata": {}}'])
def test_garbled_index(tmp_path, text):
    refused(write_sharded(tmp_path / "m", HALVES, text), "model.safetensors.index.json", "re-download")


def test_garbled_config_and_wrong_architecture(tmp_path):
    d = write_sharded(tmp_path / "m", HALVES)
    (d / "config.json").write_text("{oops")
    refused(d, d / "config.json", "not readable JSON")
    (d / "config.json").write_text(json.dumps({"architectures": ["CLIPTextModel"], "model_type": "clip_text_model"}))
    refused(d, "CLIPTextModel", "not a CLIP model", "layout='raw'", layout="hf_clip_vision")
    with open_model_dir(d) as sd:  # auto: another model's keys are read as stored
        assert sd.layout == "raw" and sorted(sd) == sorted(KEYS)
    refused(d, "unknown layout 'clip'", "auto, hf_clip_vision, raw", layout="clip")


def test_keys_that_are_not_a_clip_vision_tower(tmp_path):
    d = tmp_path / "cls"
    d.mkdir()
    save_safetensors({**_tensors(), "classifier.weight": torch.zeros(3, 8)}, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(CONFIG))
    refused(d, "'classifier.weight'", "not part of a CLIP vision tower", "layout='raw'")
    both = tmp_path / "both"
    both.mkdir()
    t = _tensors()
    save_safetensors({**t, "pre_layrnorm.weight": t["vision_model.pre_layrnorm.weight"]}, both / "model.safetensors")
    (both / "config.json").write_text(json.dumps(CONFIG))
    refused(both, "'pre_layrnorm.weight'", "both with and without")
    text = tmp_path / "text"
    text.mkdir()
    save_safetensors({"text_model.x": torch.zeros(2), "logit_scale": torch.zeros(())}, text / "model.safetensors")
    (text / "config.json").write_text(json.dumps({"architectures": ["CLIPModel"], "model_type": "clip"}))
    refused(text, "no CLIP vision weights", "'text_model.x'")


def test_torch_folders(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    torch.save(torch.nn.Linear(2, 2), d / "pytorch_model.bin")
    refused(d, "pytorch_model.bin", "allow_pickle=True")
    sh = tmp_path / "bin_sharded"
    sh.mkdir()
    torch.save({k: v for k, v in _tensors().items()}, sh / "part.bin")
    (sh / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {k: "../part.bin" for k in KEYS}}))
    refused(sh, "pytorch_model.bin.index.json", "'../part.bin'", "not a file inside")
    (sh / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {k: "part.bin" for k in KEYS}}))
    with open_model_dir(sh) as sd:
        assert sd.format == "torch" and len(sd) == len(KEYS)


def test_errors_are_tvq_errors():
    assert issubclass(CheckpointError, TvqError)
