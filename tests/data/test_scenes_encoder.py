"""Dense scenes' θ0: the pre-training recipe at tiny scale, the weights' format and the shipped asset."""
import json

import numpy as np
import pytest
import torch

from tvq_lightning.data.scenes import generate as G
from tvq_lightning.data.scenes.encoder import ENCODER, PREFIX, load_scene_encoder, timm_encoder
from tvq_lightning.data.scenes.pretrain import main as pretrain
from tvq_lightning.errors import TvqError


def test_timm_encoder_has_smps_keys():
    smp = pytest.importorskip("segmentation_models_pytorch")
    ref = smp.encoders.get_encoder(ENCODER, weights=None).state_dict()
    ours = {PREFIX + k: v for k, v in timm_encoder().state_dict().items()}
    assert list(ours) == list(ref) and all(ours[k].shape == ref[k].shape for k in ref)


def test_worker_stream_equals_in_process_stream():
    x, y = next(G.pretrain_stream(0, 4, 32, workers=1, start=2))
    x0, y0 = G.pretrain_chunk(0, 2, 4, 32)
    assert np.array_equal(x, x0) and np.array_equal(y, y0)


def test_tiny_pretraining_run_writes_a_loadable_encoder(tmp_path):
    out = tmp_path / "enc"
    pretrain(["--out", str(out), "--steps", "2", "--batch", "4", "--pool", "32", "--fresh", "4", "--image-size", "32",
              "--heldout", "32", "--log-every", "1"])
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["steps"] == 2 and recipe["batch"] == 4 and recipe["encoder"] == ENCODER
    assert {"lr", "seed", "objective", "data"} <= set(recipe) and recipe["data"]["generator_version"] == G.PRETRAIN_VERSION
    assert (out / "weights.sha256").read_text().split()[0] == recipe["sha256"]
    sd = load_scene_encoder(out)
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    assert next(iter(sd)).startswith(PREFIX)
    data = bytearray((out / "weights.safetensors").read_bytes())
    data[-1] ^= 1
    (out / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(TvqError, match="sha256"):
        load_scene_encoder(out)
    with pytest.raises(TvqError, match="no scene encoder"):
        load_scene_encoder(tmp_path / "nowhere")


def test_shipped_encoder_loads_into_dense_encoder():
    pytest.importorskip("segmentation_models_pytorch")
    from tvq_lightning.models.dense import DenseEncoder

    sd = load_scene_encoder()
    enc = DenseEncoder(ENCODER)
    enc.load_state_dict(sd, strict=True)
    loaded = load_scene_encoder(module=True)
    assert isinstance(loaded, DenseEncoder)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), enc.state_dict().values()))
    feats = loaded.eval()(torch.randn(2, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [3, 64, 64, 128, 256, 512] and torch.isfinite(feats[-1]).all()
    recipe = json.loads((load_scene_encoder.__globals__["ASSET"] / "recipe.json").read_text())
    assert recipe["steps"] > 0 and recipe["sha256"]
