"""The ``hf_clip`` encoder, text adapter and preprocessing on tiny local CLIP folders (offline)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("torchvision")

import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)

from tvq_lightning.errors import TvqError  # noqa: E402
from tvq_lightning.models.encoders import create_encoder, list_encoders  # noqa: E402
from tvq_lightning.models.hf_clip import (  # noqa: E402
    HFClipVisionEncoder,
    hf_clip_encoder,
    hf_clip_text,
    hf_clip_transform,
)
from tvq_lightning.models.zeroshot import zeroshot_head  # noqa: E402
from tvq_lightning.store.model_dir import open_model_dir  # noqa: E402

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, projection_dim=16)
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _tokenizer(d: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single letters (plus two merges), written to ``d``."""
    toks = ["<|startoftext|>", "<|endoftext|>", *LETTERS, *(c + "</w>" for c in LETTERS), "ph", "pho"]
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(toks)}))
    (d / "merges.txt").write_text("#version: 0.2\np h\nph o\n")
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hfclip")
    tok = _tokenizer(root / "vocab")
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, projection_dim=16, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=VISION, projection_dim=16)).eval()
    with torch.no_grad():
        full.logit_scale.fill_(2.0)
    full.save_pretrained(root / "full")
    tok.save_pretrained(root / "full")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "full")
    torch.manual_seed(1)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)).save_pretrained(root / "proj")
    torch.manual_seed(2)
    vision = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    vision.save_pretrained(root / "v5")
    v4 = root / "v4"  # the same weights as transformers 4 writes them
    v4.mkdir()
    with open_model_dir(root / "v5") as sd:
        save_file({f"vision_model.{k}": sd[k].contiguous() for k in sd}, str(v4 / "model.safetensors"),
                  metadata={"format": "pt"})
    cfg = json.loads((root / "v5" / "config.json").read_text())
    cfg.pop("dtype", None)
    (v4 / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "float32", "transformers_version": "4.40.0"}))
    return {p.name: p for p in root.iterdir() if p.is_dir()}


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_registered_and_state_dict_keys_are_canonical(folders):
    assert "hf_clip" in list_encoders()
    enc = create_encoder("hf_clip", model_name_or_path=str(folders["full"]))
    assert isinstance(enc, HFClipVisionEncoder) and enc.output_dim == 16
    with open_model_dir(folders["full"]) as sd:
        canon = list(sd)
        assert all(torch.equal(enc.state_dict()[k], sd[k]) for k in sd)
    assert sorted(enc.state_dict()) == sorted(canon)  # files are in name order, modules in build order
    assert sorted(n for n, _ in enc.named_parameters()) == sorted(canon)  # no prefix, no projection
    with open_model_dir(folders["v4"]) as a, open_model_dir(folders["v5"]) as b:
        assert list(a) == list(b) == canon


def test_mixing_layouts_loads_strictly(folders):
    enc = hf_clip_encoder(str(folders["full"]))
    before = enc.projection.clone()
    for name in ("v4", "v5", "proj"):
        with open_model_dir(folders[name]) as sd:
            enc.load_state_dict(dict(sd), strict=True)
            assert torch.equal(enc.state_dict()["post_layernorm.weight"], sd["post_layernorm.weight"])
    assert torch.equal(enc.projection, before)  # the frozen projection is not part of the weights


@torch.no_grad()
def test_output_equals_transformers_image_embeds(folders):
    x = _images()
    ref = CLIPVisionModelWithProjection.from_pretrained(str(folders["proj"]), local_files_only=True).eval()
    assert torch.allclose(hf_clip_encoder(str(folders["proj"]))(x), ref(pixel_values=x).image_embeds, atol=1e-5)
    pooled = CLIPVisionModel.from_pretrained(str(folders["v5"]), local_files_only=True).eval()(pixel_values=x)
    for name in ("v5", "v4"):
        enc = hf_clip_encoder(str(folders[name]))
        assert enc.projection is None and enc.output_dim == 32
        assert torch.allclose(enc(x), pooled.pooler_output, atol=1e-5)
    full = CLIPModel.from_pretrained(str(folders["full"]), local_files_only=True).eval()
    tokens = torch.tensor([[0, 5, 1]])
    want = full(input_ids=tokens, pixel_values=x).image_embeds  # normalised by CLIPModel
    got = hf_clip_encoder(str(folders["full"]))(x)
    assert torch.allclose(torch.nn.functional.normalize(got, dim=-1), want, atol=1e-5)
    no_proj = hf_clip_encoder(str(folders["full"]), with_projection=False)
    assert no_proj.projection is None and no_proj(x).shape == (3, 32)


def test_with_projection_required_but_missing(folders):
    with pytest.raises(TvqError, match="no visual_projection.weight.*with_projection=False") as e:
        hf_clip_encoder(str(folders["v5"]), with_projection=True)
    assert "\n" not in str(e.value)


def test_missing_model_is_one_offline_line(tmp_path):
    with pytest.raises(TvqError) as e:
        hf_clip_encoder("nobody-here/no-such-clip", cache_dir=str(tmp_path / "cache"))
    msg = str(e.value)
    assert "\n" not in msg and "no-such-clip" in msg and "hf download" in msg and "HF_HUB_OFFLINE=0" in msg
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"x")
    with pytest.raises(TvqError, match="is a file"):
        hf_clip_encoder(str(file))
    with pytest.raises(TvqError, match=r"^\./no/such/dir: no such folder"):
        hf_clip_encoder("./no/such/dir")


@torch.no_grad()
def test_text_adapter_and_zeroshot_head(folders):
    model, tok, logit_scale = hf_clip_text(str(folders["full"]))
    assert float(logit_scale) == pytest.approx(2.0)
    tokens = tok(["a photo of a cat", "dog"])
    assert tokens.dtype == torch.long and tokens.shape == (2, 16)
    full = CLIPModel.from_pretrained(str(folders["full"]), local_files_only=True).eval()
    want = full(input_ids=tokens, pixel_values=_images(1)).text_embeds
    assert torch.allclose(model.encode_text(tokens, normalize=True), want, atol=1e-5)
    head = zeroshot_head(model, tok, ["cat", "dog", "bird"], ["a photo of a {}", "a {}"])
    rows = head.weight
    assert rows.shape == (3, 16)
    assert torch.allclose(rows.norm(dim=1), torch.full((3,), float(np.exp(2.0))), rtol=1e-5)
    enc = hf_clip_encoder(str(folders["full"]))
    assert head(enc(_images())).shape == (3, 3)


def test_text_needs_a_full_clip_folder(folders):
    with pytest.raises(TvqError, match="clip_vision_model.*CLIPModel") as e:
        hf_clip_text(str(folders["v5"]))
    assert "\n" not in str(e.value)


def _processors():
    kw = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pil_cls = getattr(transformers, "CLIPImageProcessorPil", None)
    exact = pil_cls(**kw) if pil_cls is not None else CLIPImageProcessor(**kw)  # transformers 4: PIL by default
    return exact, CLIPImageProcessor(**kw)


@pytest.mark.parametrize("wh", [(50, 37), (37, 61), (64, 64), (33, 40)])
def test_transform_matches_clip_image_processor(folders, wh):
    rng = np.random.default_rng(sum(wh))
    img = Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    got = hf_clip_transform(str(folders["full"]))(img)
    exact, default = _processors()
    assert got.shape == (3, 32, 32) and got.dtype == torch.float32
    assert torch.allclose(got, exact(images=img, return_tensors="pt").pixel_values[0], atol=1e-5)
    step = 1 / 255 / 0.26 + 1e-4  # one 8-bit step after normalisation: the tensor resize may differ by that
    assert (got - default(images=img, return_tensors="pt").pixel_values[0]).abs().max() <= step


def test_transform_without_preprocessor_config_uses_image_size(folders):
    tf = hf_clip_transform(str(folders["v5"]))
    img = Image.fromarray(np.zeros((40, 60), np.uint8))  # grey: converted to RGB
    exact, _ = _processors()
    out = tf(img)
    assert out.shape == (3, 32, 32)
    assert torch.allclose(out, exact(images=img.convert("RGB"), return_tensors="pt").pixel_values[0], atol=1e-5)


@torch.no_grad()
def test_store_and_merge_from_mixed_folders_load_into_the_encoder(folders, tmp_path):
    """theta_0 a full CLIPModel (transformers 5), fine-tunes saved by transformers 4 and 5."""
    import copy

    from tvq_lightning.merging import merge_state_dict
    from tvq_lightning.store import StoreConfig, quantize_to_store

    pre = open_model_dir(folders["full"])
    fts = {"a": open_model_dir(folders["v4"]), "b": open_model_dir(folders["proj"])}
    quantize_to_store(pre, fts, tmp_path / "store", StoreConfig(scheme="tvq", bits=4), progress=False)
    merged = merge_state_dict(tmp_path / "store", pre, "task_arithmetic")
    enc = hf_clip_encoder(str(folders["full"]))
    enc.load_state_dict(merged, strict=True)
    twin = copy.deepcopy(enc)
    x = _images()
    assert torch.equal(twin(x), enc(x)) and enc(x).shape == (3, 16)
