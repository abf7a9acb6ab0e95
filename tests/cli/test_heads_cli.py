"""``tvq heads``: zero-shot heads from a tiny open_clip model (random weights in a local file) and
from the project's tiny CLIP; caching by fingerprint, --overwrite, one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tvq_lightning.data.zoo import get_task
from tvq_lightning.models.heads import ClassificationHead
from tvq_lightning.models.zeroshot import zeroshot_head
from tvq_lightning.models.zeroshot_build import FORMAT, HeadsConfig, build_heads, read_head_metadata

MODEL = "tvq-heads-tiny"
TINY_OPENCLIP = {"embed_dim": 16,
                 "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
                 "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
CUSTOM = {"name": "birds", "classnames": ["robin", "crow", "blue jay"], "templates": ["a photo of a {}, a bird.",
                                                                                       "a blurry photo of a {}."]}


class OpenClipWorld:
    """A registered tiny open_clip config, its random weights on disk and a custom task file."""

    def __init__(self, root: Path, seed: int = 0):
        import open_clip

        self.root = root
        self.config = root / f"{MODEL}.json"
        self.config.write_text(json.dumps(TINY_OPENCLIP))
        open_clip.add_model_config(self.config)
        self.weights = self.write_weights(seed)
        self.custom = root / "birds.json"
        self.custom.write_text(json.dumps(CUSTOM))
        self.out = root / "heads"

    def write_weights(self, seed: int, name: str = "weights.safetensors") -> Path:
        import open_clip
        from safetensors.torch import save_file

        torch.manual_seed(seed)
        model = open_clip.create_model(MODEL)
        with torch.no_grad():
            model.logit_scale.fill_(2.5)  # exp = 12.18..., not CLIP's default: the scale must come from the file
        path = self.root / name
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        return path

    def args(self, *tasks: str, weights: Path | None = None) -> list[str]:
        return ["heads", "--out", self.out, "--tasks", *tasks, "--model", MODEL, "--pretrained",
                weights or self.weights, "--openclip-config", self.config, "--quiet"]

    def reference(self, classnames, templates, weights: Path | None = None) -> ClassificationHead:
        import open_clip

        model = open_clip.create_model(MODEL, pretrained=str(weights or self.weights)).eval()
        return zeroshot_head(model, open_clip.get_tokenizer(MODEL), classnames, templates)


@pytest.fixture
def world(tmp_path):
    pytest.importorskip("open_clip")
    return OpenClipWorld(tmp_path)


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


@pytest.mark.zoo
def test_builds_catalog_and_custom_heads(world, tvq):
    res = tvq(*world.args("EuroSAT", "pcam", str(world.custom)))
    assert res.rc == 0, res.err
    files = {p.name for p in world.out.iterdir()}
    assert files == {"EuroSAT.safetensors", "PCAM.safetensors", "birds.safetensors"}
    assert "3 head(s)" in res.out and "3 built" in res.out
    scale = torch.tensor(2.5).exp()
    for stem, (names, templates) in {"EuroSAT": (get_task("EuroSAT").classnames, get_task("EuroSAT").templates),
                                     "PCAM": (get_task("PCAM").classnames, get_task("PCAM").templates),
                                     "birds": (CUSTOM["classnames"], CUSTOM["templates"])}.items():
        head = ClassificationHead.load(world.out / f"{stem}.safetensors")
        assert head.weight.shape == (len(names), 16) and torch.count_nonzero(head.bias) == 0
        torch.testing.assert_close(head.weight.norm(dim=1), scale.expand(len(names)), rtol=1e-5, atol=1e-5)
        ref = world.reference(names, templates)
        torch.testing.assert_close(head.weight, ref.weight, rtol=1e-5, atol=1e-6)
        rows = F.normalize(head.weight, dim=1)
        assert not torch.allclose(rows[0], rows[1])  # distinct classes, distinct rows
        meta = read_head_metadata(world.out / f"{stem}.safetensors")
        assert meta["format"] == FORMAT and meta["num_classes"] == str(len(names)) and len(meta["fingerprint"]) == 64


@pytest.mark.zoo
def test_cached_heads_are_reused_and_rebuilt_when_inputs_change(world, tvq):
    assert tvq(*world.args("EuroSAT", str(world.custom))).rc == 0
    euro, birds = world.out / "EuroSAT.safetensors", world.out / "birds.safetensors"
    before = {p: _stamp(p) for p in (euro, birds)}
    res = tvq(*world.args("EuroSAT", str(world.custom)))
    assert res.rc == 0 and "2 reused" in res.out and "built" not in res.out
    assert {p: _stamp(p) for p in (euro, birds)} == before  # not rewritten

    # new templates for the custom task: only its head is rebuilt
    world.custom.write_text(json.dumps({**CUSTOM, "templates": ["a {} in a tree."]}))
    res = tvq(*world.args("EuroSAT", str(world.custom)))
    assert res.rc == 0 and "1 rebuilt, 1 reused" in res.out
    assert _stamp(euro) == before[euro] and _stamp(birds) != before[birds]
    torch.testing.assert_close(ClassificationHead.load(birds).weight,
                               world.reference(CUSTOM["classnames"], ["a {} in a tree."]).weight, rtol=1e-5, atol=1e-6)

    # other weights: every head is rebuilt
    other = world.write_weights(1, "other.safetensors")
    res = tvq(*world.args("EuroSAT", str(world.custom), weights=other))
    assert res.rc == 0 and "2 rebuilt" in res.out
    torch.testing.assert_close(ClassificationHead.load(euro).weight,
                               world.reference(get_task("EuroSAT").classnames, get_task("EuroSAT").templates,
                                               weights=other).weight, rtol=1e-5, atol=1e-6)

    # --overwrite rebuilds what is unchanged
    stamp = _stamp(euro)
    res = tvq(*world.args("EuroSAT", weights=other), "--overwrite")
    assert res.rc == 0 and "1 rebuilt" in res.out and _stamp(euro) != stamp


@pytest.mark.zoo
def test_python_api_names_and_suite(world):
    cfg = HeadsConfig(out=str(world.out), tasks=("euro=EuroSAT", f"flock={world.custom}"), model=MODEL,
                      pretrained=str(world.weights), openclip_config=str(world.config), quiet=True)
    paths = build_heads(cfg)
    assert paths == {"euro": world.out / "euro.safetensors", "flock": world.out / "flock.safetensors"}
    assert all(p.is_file() for p in paths.values())
    assert read_head_metadata(paths["euro"])["task"] == "EuroSAT"


@pytest.mark.zoo
def test_config_file_round_trip(world, tvq, tmp_path):
    res = tvq(*world.args("EuroSAT", "svhn"), "--print_config")
    assert res.rc == 0 and "tasks:" in res.out and "- svhn" in res.out
    cfg = tmp_path / "heads.yaml"
    cfg.write_text(res.out)
    res = tvq("heads", "-c", cfg)
    assert res.rc == 0, res.err
    assert {p.name for p in world.out.iterdir()} == {"EuroSAT.safetensors", "SVHN.safetensors"}


def test_tiny_clip_source(tmp_path, tvq):
    pytest.importorskip("open_clip")
    from tvq_lightning.data.embedded.tasks import TASKS
    from tvq_lightning.models.tiny_clip import load_tiny_clip

    shapes = TASKS["shapes"]
    spec = tmp_path / "shapes.json"
    spec.write_text(json.dumps({"classnames": list(shapes.classnames), "templates": list(shapes.templates)}))
    out = tmp_path / "heads"
    res = tvq("heads", "--source", "tiny_clip", "--out", out, "--tasks", spec, "--quiet")
    assert res.rc == 0, res.err
    model = load_tiny_clip()
    ref = zeroshot_head(model, model.tokenizer, shapes.classnames, shapes.templates)
    head = ClassificationHead.load(out / "shapes.safetensors")
    torch.testing.assert_close(head.weight, ref.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.weight.norm(dim=1), model.logit_scale.exp().detach().expand(len(shapes.classnames)),
                               rtol=1e-5, atol=1e-5)
    # a catalog task's words are not in the tiny CLIP's vocabulary: one line naming the task and the word
    before = sorted(out.iterdir())
    res = tvq("heads", "--source", "tiny_clip", "--out", out, "--tasks", "x=" + str(spec), "EuroSAT", "--quiet")
    assert res.rc == 2 and res.err.startswith("tvq: error: task EuroSAT: the word") and res.err.count("\n") == 1
    assert sorted(out.iterdir()) == before  # checked before any head was written (x would have been first)


@pytest.mark.zoo
def test_bad_task_name_is_one_line(world, tvq):
    res = tvq(*world.args("EuroSAT", "sun396"))
    assert res.rc == 2 and res.out == ""
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tvq: error: --tasks: unknown task 'sun396'")
    assert "did you mean SUN397?" in lines[0]
    assert not world.out.exists()  # refused before anything was written


def test_missing_options_are_one_line(tvq, tmp_path):
    res = tvq("heads", "--tasks", "EuroSAT")
    assert res.rc == 2 and res.err.startswith("tvq: error: tvq heads: --out required")
    res = tvq("heads", "--out", tmp_path / "h", "--tasks", "EuroSAT", "--model", "ViT-B-32")
    assert res.rc == 2 and "--pretrained is required" in res.err
    res = tvq("heads", "--out", tmp_path / "h", "--suite", "9")
    assert res.rc == 2 and "--suite '9': choose one of 8, 14, 20" in res.err
    res = tvq("heads", "--out", tmp_path / "h")
    assert res.rc == 2 and "no tasks: give --tasks" in res.err
