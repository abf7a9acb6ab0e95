"""The encoder registry: open_clip (a tiny local config), timm ``test_vit``, plain modules, tiny."""
import json

import pytest
import torch
from torch import nn

from tvq_lightning.errors import TvqError
from tvq_lightning.models.encoders import create_encoder, list_encoders, module_encoder, open_clip_transform
from tvq_lightning.quant.policy import module_linear_keys
from tvq_lightning.models import TinyEncoder

TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
             "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}


def test_registry_lists_every_kind():
    assert list_encoders() == ["hf_clip", "module", "open_clip", "smp", "timm", "tiny"]
    with pytest.raises(TvqError, match="unknown encoder kind 'nope'.*open_clip"):
        create_encoder("nope")


def test_tiny():
    enc = create_encoder("tiny", width=32, depth=1, image=16, patch=4, out_dim=8)
    assert isinstance(enc, TinyEncoder)
    assert enc(torch.randn(2, 3, 16, 16)).shape == (2, 8)
    a, b = create_encoder("tiny", seed=3), create_encoder("tiny", seed=3)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_module_kind():
    lin = create_encoder("module", class_path="torch.nn.Linear", in_features=4, out_features=2)
    assert isinstance(lin, nn.Linear) and lin.out_features == 2
    inst = nn.Identity()
    assert module_encoder(inst) is inst
    with pytest.raises(TvqError, match="cannot import 'torch.nn.NoSuchLayer'"):
        create_encoder("module", class_path="torch.nn.NoSuchLayer")
    with pytest.raises(TvqError, match="not an nn.Module"):
        create_encoder("module", class_path="collections.OrderedDict")


@pytest.mark.zoo
def test_open_clip_tiny_local_config(tmp_path):
    pytest.importorskip("open_clip")
    cfg = tmp_path / "tvq-test-tiny-vit.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    enc = create_encoder("open_clip", model_name="tvq-test-tiny-vit", config=str(cfg))
    assert type(enc).__name__ == "VisionTransformer"
    assert enc(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    keys = module_linear_keys(enc)
    assert {"conv1.weight", "transformer.resblocks.0.attn.in_proj_weight",
            "transformer.resblocks.1.mlp.c_proj.weight"} <= keys
    from PIL import Image

    x = open_clip_transform(enc)(Image.new("RGB", (48, 40), (120, 30, 200)))
    assert x.shape == (3, 32, 32)
    with pytest.raises(TvqError, match="no model 'tvq-no-such-model'"):
        create_encoder("open_clip", model_name="tvq-no-such-model")
    with pytest.raises(TvqError, match="does not exist"):
        create_encoder("open_clip", model_name="x", config=str(tmp_path / "missing.json"))


@pytest.mark.zoo
def test_timm_test_vit():
    pytest.importorskip("timm")
    enc = create_encoder("timm", model_name="test_vit", img_size=32)
    out = enc(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, enc.num_features)  # num_classes=0: pooled features, no classifier
    with pytest.raises(TvqError, match="timm has no model"):
        create_encoder("timm", model_name="tvq_no_such_model")
