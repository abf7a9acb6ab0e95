"""Hugging Face model folders as checkpoints: every file format and key layout of a CLIP vision
tower (transformers 4 and 5, vision-only and full CLIPModel, single file, shards, torch.save)
opens to the same canonical keys and values."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel  # noqa: E402

from tvq_lightning.errors import CheckpointError  # noqa: E402
from tvq_lightning.store.model_dir import find_weights, hf_vision_keys, open_model_dir  # noqa: E402

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, projection_dim=16)
TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _v4_config(cfg: CLIPVisionConfig) -> dict:
    """config.json as transformers 4 writes it for a CLIPVisionModel."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("dtype", "transformers_version", "architectures")}
    return {"architectures": ["CLIPVisionModel"], **d, "model_type": "clip_vision_model", "torch_dtype": "float32",
            "transformers_version": "4.40.0"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(**VISION)
    vision = CLIPVisionModel(cfg).eval()
    canon = {c: vision.state_dict()[k].clone() for c, k in hf_vision_keys(vision.state_dict()).items()}
    out = {"canon": canon}
    vision.save_pretrained(root / "v5")
    vision.save_pretrained(root / "sharded", max_shard_size="20KB")
    v4 = root / "v4"
    v4.mkdir()
    save_file({f"vision_model.{k}": v.contiguous() for k, v in canon.items()}, str(v4 / "model.safetensors"),
              metadata={"format": "pt"})
    (v4 / "config.json").write_text(json.dumps(_v4_config(cfg)))
    pt = root / "bin"
    pt.mkdir()
    torch.save({f"vision_model.{k}": v for k, v in canon.items()}, pt / "pytorch_model.bin")
    (pt / "config.json").write_text(json.dumps(_v4_config(cfg)))
    ptsh = root / "bin_sharded"
    ptsh.mkdir()
    keys = list(canon)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, part in halves.items():
        torch.save({f"vision_model.{k}": canon[k] for k in part}, ptsh / name)
    (ptsh / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {f"vision_model.{k}": n for n, part in halves.items() for k in part}}))
    (ptsh / "config.json").write_text(json.dumps(_v4_config(cfg)))
    full = CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)).eval()
    full_vision = {k: full.state_dict()[k] for k in full.state_dict() if k.startswith("vision_model.")}
    assert len(full_vision) == len(canon)
    for k in full_vision:
        full_vision[k].copy_(canon[k.removeprefix("vision_model.")])
    full.save_pretrained(root / "full")
    return {"root": root, **out, **{p.name: p for p in root.iterdir() if p.is_dir()}}


@pytest.mark.parametrize("name", ["v5", "v4", "sharded", "bin", "bin_sharded", "full"])
def test_every_layout_gives_the_canonical_keys_and_values(folders, name):
    canon = folders["canon"]
    with open_model_dir(folders[name]) as sd:
        assert sd.layout == "hf_clip_vision"
        assert sorted(sd) == sorted(canon)
        assert all(not k.startswith(("vision_model.", "visual_projection", "text_")) for k in sd)
        for k in canon:
            assert torch.equal(sd[k], canon[k]), k
            assert sd.meta(k) == (tuple(canon[k].shape), canon[k].dtype)
        sd.release()
        sd.release(next(iter(sd)))


def test_key_identity_across_folders_including_order(folders):
    orders = {}
    for name in ("v5", "v4", "sharded", "full"):
        with open_model_dir(folders[name]) as sd:
            orders[name] = list(sd)
    assert orders["v5"] == orders["v4"] == orders["full"]
    assert sorted(orders["sharded"]) == sorted(orders["v5"])


def test_weight_file_preference_and_formats(folders):
    assert find_weights(folders["v5"]).name == "model.safetensors"
    assert find_weights(folders["sharded"]).name == "model.safetensors.index.json"
    assert find_weights(folders["bin"]).name == "pytorch_model.bin"
    with open_model_dir(folders["sharded"]) as sd:
        assert sd.format == "safetensors" and sd.metadata.get("format") == "pt"
        assert sd.path == folders["sharded"]
    with open_model_dir(folders["bin_sharded"]) as sd:
        assert sd.format == "torch"


def test_raw_layout_and_prefix(folders):
    with open_model_dir(folders["full"], layout="raw") as sd:
        assert sd.layout == "raw"
        assert {"visual_projection.weight", "text_projection.weight", "logit_scale"} <= set(sd)
        assert any(k.startswith("text_model.") for k in sd)
    with open_model_dir(folders["v4"], prefix="vision_model.") as sd:  # the caller chose the keys: raw
        assert sd.layout == "raw" and sorted(sd) == sorted(folders["canon"])
    with open_model_dir(folders["full"], prefix="text_model.") as sd:
        assert sd.layout == "raw" and "embeddings.token_embedding.weight" in sd
    with open_model_dir(folders["v4"], prefix="vision_model.", layout="hf_clip_vision") as sd:
        assert sorted(sd) == sorted(folders["canon"])


def test_full_clip_keeps_only_the_vision_tower(folders):
    with open_model_dir(folders["full"], layout="hf_clip_vision") as sd:
        assert "visual_projection.weight" not in sd and len(sd) == len(folders["canon"])


def test_old_position_ids_buffer_is_dropped(folders, tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    sd = {f"vision_model.{k}": v.contiguous() for k, v in folders["canon"].items()}
    sd["vision_model.embeddings.position_ids"] = torch.arange(17).unsqueeze(0)
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text((folders["v4"] / "config.json").read_text())
    with open_model_dir(d) as got:
        assert sorted(got) == sorted(folders["canon"])


def test_auto_detects_clip_without_config_and_leaves_others_raw(folders, tmp_path):
    d = tmp_path / "noconfig"
    d.mkdir()
    (d / "model.safetensors").write_bytes((folders["v4"] / "model.safetensors").read_bytes())
    with open_model_dir(d) as sd:
        assert sd.layout == "hf_clip_vision" and sorted(sd) == sorted(folders["canon"])
    other = tmp_path / "bert"
    other.mkdir()
    save_file({"encoder.weight": torch.ones(2, 2), "vision_model.x": torch.zeros(1)}, str(other / "model.safetensors"))
    (other / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with open_model_dir(other) as sd:
        assert sd.layout == "raw" and sorted(sd) == ["encoder.weight", "vision_model.x"]
    with pytest.raises(CheckpointError, match="BertModel.*layout='raw'"):
        open_model_dir(other, layout="hf_clip_vision")


def test_hf_vision_keys_mapping():
    keys = ["vision_model.embeddings.class_embedding", "vision_model.encoder.layers.0.mlp.fc1.weight",
            "visual_projection.weight", "text_model.final_layer_norm.weight", "text_projection.weight", "logit_scale"]
    assert hf_vision_keys(keys) == {"embeddings.class_embedding": keys[0], "encoder.layers.0.mlp.fc1.weight": keys[1]}
    flat = ["embeddings.class_embedding", "post_layernorm.bias"]
    assert hf_vision_keys(flat) == {k: k for k in flat}


def test_lazy_views_of_shards_are_zero_copy(folders):
    with open_model_dir(folders["sharded"]) as sd:
        k = next(iter(sd))
        t = sd[k]
    t2 = t.clone()
    t.add_(1)  # a private copy-on-write page, never the file
    with open_model_dir(folders["sharded"]) as sd:
        assert torch.equal(sd[k], t2)


def test_fingerprint_is_the_same_for_every_layout(folders):
    from tvq_lightning.store import fingerprint_state_dict

    prints = set()
    for name in ("v5", "v4", "sharded", "bin", "full"):
        with open_model_dir(folders[name]) as sd:
            prints.add(fingerprint_state_dict(sd))
    assert len(prints) == 1
