"""DenseEncoder / DenseHead: smp encoders as shared multi-scale encoders, per-task decoders."""
import copy

import pytest
import torch
from torch.func import functional_call

pytest.importorskip("segmentation_models_pytorch")

from tvq_lightning.errors import TvqError  # noqa: E402
from tvq_lightning.models.dense import PAPER_NYUV2, DenseEncoder, DenseHead  # noqa: E402
from tvq_lightning.models.encoders import create_encoder  # noqa: E402


@pytest.fixture(scope="module")
def enc():
    return DenseEncoder("resnet18", output_stride=8)


def test_encoder_features_keys_and_registry(enc):
    x = torch.randn(1, 3, 32, 48)
    feats = enc(x)
    assert enc.out_channels == (3, 64, 64, 128, 256, 512) and enc.output_stride == 8
    assert [f.shape[1] for f in feats] == list(enc.out_channels)
    assert feats[0] is x and feats[-1].shape[-2:] == (4, 6)          # dilated: stride 8
    keys = list(enc.state_dict())
    assert keys[:2] == ["conv1.weight", "bn1.weight"] and "layer4.1.bn2.running_var" in keys
    assert isinstance(create_encoder("smp", name="resnet18"), DenseEncoder)


def test_encoder_copy_functional_call_and_train_mode(enc):
    c = copy.deepcopy(enc).eval()
    assert c.conv1 is c._inner.conv1 and c.conv1 is not enc.conv1 and not c._inner.training
    zero = {k: torch.zeros_like(v) for k, v in c.state_dict().items()}
    assert functional_call(c, zero, (torch.randn(1, 3, 16, 16),))[-1].abs().sum() == 0


def test_encoder_local_weights(tmp_path, enc):
    from safetensors.torch import save_file

    path = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(path))
    other = DenseEncoder("resnet18", weights=str(path), output_stride=8)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), enc.state_dict().values()))
    with pytest.raises(TvqError, match="do not exist"):
        DenseEncoder("resnet18", weights=str(tmp_path / "nope.safetensors"))


def test_offline_weights_error_is_one_line():
    with pytest.raises(TvqError, match="offline") as ei:
        DenseEncoder("resnet18", weights="imagenet")
    assert "\n" not in str(ei.value) and "weights=/path" in str(ei.value)
    with pytest.raises(TvqError, match="no encoder"):
        DenseEncoder("not-an-encoder")


@pytest.mark.parametrize("decoder,channels", [("unet", (8, 8, 8, 8, 8)), ("fpn", (16, 32)),
                                              ("deeplabv3", 16), ("deeplabv3plus", 16)])
def test_heads_output_input_size_and_roundtrip(tmp_path, enc, decoder, channels):
    head = DenseHead(enc.out_channels, 3, decoder=decoder, decoder_channels=channels).eval()
    if decoder == "fpn":                                  # FPN needs an undilated encoder
        enc = DenseEncoder("resnet18")
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = enc.eval()(x)
        out = head(feats)
    assert out.shape == (2, 3, 64, 96)
    head.save(tmp_path / "h.safetensors")
    again = DenseHead.load(tmp_path / "h.safetensors").eval()
    assert again.config == head.config
    with torch.no_grad():
        assert torch.equal(again(feats), out)


def test_head_errors(tmp_path, enc):
    with pytest.raises(TvqError, match="unknown dense decoder"):
        DenseHead(enc.out_channels, 1, decoder="pspnet")
    with pytest.raises(TvqError, match="unet decoder_channels"):
        DenseHead(enc.out_channels, 1, decoder_channels=(8, 8))
    head = DenseHead(enc.out_channels, 1, decoder="fpn", decoder_channels=(16, 32))
    with pytest.raises(TvqError, match="multiples of 32"):
        head(enc(torch.randn(1, 3, 40, 40)))
    with pytest.raises(TvqError, match="undilated"):
        head(enc(torch.randn(1, 3, 64, 64)))
    with pytest.raises(TvqError, match="does not exist"):
        DenseHead.load(tmp_path / "missing.safetensors")


def test_paper_preset_tiny():
    """The papers' model (ResNet-50, stride 8, DeepLab ASPP per task) at a tiny input size."""
    from tvq_lightning.models.dense import paper_nyuv2

    enc, heads = paper_nyuv2(tasks=("depth",))
    assert enc.output_stride == 8 and enc.out_channels[-1] == 2048 and PAPER_NYUV2["image_size"] == (288, 384)
    head = heads["depth"].eval()
    assert head.config["decoder"] == "deeplabv3" and head.config["decoder_channels"] == 256
    with torch.no_grad():
        assert head(enc.eval()(torch.randn(1, 3, 16, 24))).shape == (1, 1, 16, 24)
