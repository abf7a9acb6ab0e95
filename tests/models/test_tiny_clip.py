"""The tiny CLIP: word tokenizer, towers, save/load round trip with checksums."""
import json

import pytest
import torch
import torch.nn.functional as F

from tvq_lightning.data.embedded import vocabulary
from tvq_lightning.errors import TvqError
from tvq_lightning.models.tiny_clip import (
    WordTokenizer,
    load_tiny_clip,
    save_tiny_clip,
)


def test_tokenizer_layout():
    tok = WordTokenizer(["a", "red", "circle"], context_length=8)
    assert (tok.pad, tok.sot, tok.eot, tok.vocab_size) == (0, 1, 5, 6)
    out = tok(["a red circle", "Circle"])
    assert out.dtype == torch.long and out.shape == (2, 8)
    assert out[0].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
    assert out[1].tolist() == [1, 4, 5, 0, 0, 0, 0, 0]  # lower-cased
    assert int(out.max()) == tok.eot and tok.eot == tok.vocab_size - 1  # eot is the highest id
    assert tok("red").shape == (1, 8)
    assert tok([]).shape == (0, 8)


def test_tokenizer_truncation_keeps_eot():
    tok = WordTokenizer(["a", "b"], context_length=5)
    out = tok("a b a b a b a")[0]
    assert out.tolist() == [1, 2, 3, 2, tok.eot]
    assert (out.argmax() == 4).item()


def test_tokenizer_unknown_word_names_it():
    tok = WordTokenizer(vocabulary())
    with pytest.raises(TvqError, match="the word 'purple' of 'a purple circle' is not in this tokenizer's vocab"):
        tok(["a red circle", "a purple circle"])


def test_shapes_normalisation_and_split_image_tower(small_clip):
    model = small_clip().eval()
    assert model.tokenizer.vocab == vocabulary()  # the default vocabulary
    x = torch.randn(3, 3, 32, 32)
    tokens = model.tokenizer(["a red circle", "the digit seven", "a bright top left quadrant"])
    feats = model.visual.stem(x)
    assert feats.shape == (3, 16, 4, 4)
    z = model.encode_image(x)
    assert z.shape == (3, 16)
    torch.testing.assert_close(z, model.visual.top(feats))
    torch.testing.assert_close(model.encode_image(x, normalize=True), F.normalize(z, dim=-1))
    assert not torch.allclose(z.norm(dim=-1), torch.ones(3))
    t = model.encode_text(tokens)
    assert t.shape == (3, 16)
    img, txt, scale = model(x, tokens)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt, F.normalize(t, dim=-1))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_text_is_pooled_at_eot(small_clip):
    model = small_clip().eval()
    tokens = model.tokenizer(["a red circle", "two blue squares"])
    changed = tokens.clone()
    changed[:, -3:] = 7  # words after the end-of-text token
    torch.testing.assert_close(model.encode_text(tokens), model.encode_text(changed))
    before = tokens.clone()
    before[:, 1] = 7  # a word before it changes the embedding
    assert not torch.allclose(model.encode_text(tokens), model.encode_text(before))


def test_bad_channel_count_raises(small_clip):
    with pytest.raises(TvqError, match="4 conv blocks; give 4 channel counts"):
        small_clip(channels=(8, 16))


def test_save_load_round_trip_in_fp16(tmp_path, small_clip):
    model = small_clip()
    with torch.no_grad():
        model.logit_scale.fill_(4.321)
    d = save_tiny_clip(model, tmp_path / "clip", extra={"note": "test"})
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "weights.safetensors"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model"] == model.config and cfg["note"] == "test" and len(cfg["sha256"]) == 64
    loaded = load_tiny_clip(d)
    assert not loaded.training and loaded.config == model.config
    sd, ref = loaded.state_dict(), model.state_dict()
    assert sd.keys() == ref.keys()
    for k, v in ref.items():
        assert sd[k].dtype == torch.float32
        assert torch.equal(sd[k], v.half().float()), k
    assert any(not torch.equal(v.half().float(), v) for v in ref.values())  # fp16 did round something
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.load_state_dict({k: v.half().float() for k, v in ref.items()})
        torch.testing.assert_close(loaded.encode_image(x), model.eval().encode_image(x))


def test_load_checks_sha256_and_presence(tmp_path, small_clip):
    d = save_tiny_clip(small_clip(), tmp_path / "clip")
    blob = bytearray((d / "weights.safetensors").read_bytes())
    blob[-1] ^= 0x01  # one bit of one weight
    (d / "weights.safetensors").write_bytes(bytes(blob))
    with pytest.raises(TvqError, match="sha256 differs"):
        load_tiny_clip(d)
    with pytest.raises(TvqError, match="holds no tiny CLIP.*tvq fit -c configs/pretrain_tiny_clip.yaml"):
        load_tiny_clip(tmp_path / "nowhere")
    (d / "config.json").unlink()
    with pytest.raises(TvqError, match="holds no tiny CLIP"):
        load_tiny_clip(d)
