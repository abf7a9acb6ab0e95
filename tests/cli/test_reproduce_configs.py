"""Every config under ``configs/reproduce/`` runs on stand-ins laid out exactly where it expects its
inputs (the task_vectors / tall_masks / FusionBench trees, heads, data), from a scratch working
directory: the sweep configs through ``tvq sweep --dry_run`` (which opens θ0 and every fine-tuned
checkpoint, builds the encoder with θ0, reads every head and instantiates the datamodule), the
Tinting config through ``tvq fit`` for two steps. The CLIP models are shrunk to tiny ones with the
same key layout; only the encoder option is overridden where the config names a real open_clip
architecture."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("open_clip")

from tvq_lightning.cli.main import main  # noqa: E402
from tvq_lightning.data.zoo import get_task  # noqa: E402
from tvq_lightning.models.heads import ClassificationHead  # noqa: E402
from tvq_lightning.store import StoreConfig, quantize_to_store  # noqa: E402
from tvq_lightning.store.st_stream import save_safetensors  # noqa: E402

pytestmark = pytest.mark.zoo

ROOT = Path(__file__).resolve().parents[2]
REPRO = ROOT / "configs" / "reproduce"
SWEEPS = sorted(p.name for p in REPRO.glob("*.yaml") if yaml.safe_load(p.read_text()).get("backend") == "model")
TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "patch_size": 8, "head_width": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1}}


def _load(name: str) -> dict:
    return yaml.safe_load((REPRO / name).read_text())


def test_every_config_is_covered():
    """A new config under configs/reproduce/ must be a sweep (covered below) or the Tinting recipe."""
    names = {p.name for p in REPRO.glob("*.yaml")}
    assert names == {*SWEEPS, "tinting_vitb32_8.yaml"}
    assert {"tvq_vitb32_8.yaml", "tvq_vitl14_8.yaml", "tvq_vitb32_14.yaml", "tvq_vitb32_20.yaml",
            "fusionbench_vitb32_8.yaml"} <= set(SWEEPS)
    for name in names:
        first = (REPRO / name).read_text().splitlines()[0]
        assert first.startswith("# tvq ") and f"configs/reproduce/{name}" in first, name


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory) -> dict:
    """A tiny open_clip config (registered) and its image tower's state dict."""
    import open_clip

    root = tmp_path_factory.mktemp("oc")
    cfg = root / "tvq-tiny-repro.json"
    cfg.write_text(json.dumps(TINY))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    visual = open_clip.create_model("tvq-tiny-repro").visual.state_dict()
    return {"config": str(cfg), "visual": visual,
            "encoder": {"kind": "open_clip", "model_name": "tvq-tiny-repro", "config": str(cfg)}}


def _write_heads(heads_dir: Path, tasks, dim: int) -> None:
    heads_dir.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(tasks):
        g = torch.Generator().manual_seed(i)
        n = len(get_task(t).classnames)
        ClassificationHead(torch.randn(n, dim, generator=g)).save(heads_dir / f"{t}.safetensors")


def _write_open_clip_release(cfg: dict, visual: dict) -> None:
    """θ0 and fine-tunes at the config's paths, as the releases' ImageEncoder state dicts (``model.visual.*``
    plus a text leftover), so the config's own prefix must be right."""
    def encoder_sd(scale: float, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        sd = {"model.visual." + k: v + scale * torch.randn(v.shape, generator=g) for k, v in visual.items()}
        sd["model.token_embedding.weight"] = torch.zeros(4, 16)
        return sd

    paths = [(cfg["pretrained"], 0.0)] + [(p, 0.01) for p in cfg["finetuned"].values()]
    for i, (path, scale) in enumerate(paths):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(encoder_sd(scale, i), path)


@pytest.mark.parametrize("name", [n for n in SWEEPS if _load(n)["encoder"]["kind"] == "open_clip"])
def test_open_clip_sweep_configs_dry_run(name, tiny_open_clip, tmp_path, monkeypatch, capsys):
    cfg = _load(name)
    monkeypatch.chdir(tmp_path)
    _write_open_clip_release(cfg, tiny_open_clip["visual"])
    _write_heads(Path(cfg["heads_dir"]), cfg["finetuned"], TINY["embed_dim"])
    rc = main(["sweep", "-c", str(REPRO / name), "--dry_run", "--no-progress",
               "--encoder", json.dumps(tiny_open_clip["encoder"])])
    assert rc == 0
    out = capsys.readouterr().out
    tasks = list(cfg["finetuned"])
    assert f"dry run: {len(tasks)} tasks ({', '.join(tasks)})" in out
    for scheme in cfg["schemes"]:
        assert f"{scheme}={cfg['out']}/stores/{scheme}" in out
    assert not Path(cfg["out"]).joinpath("stores").exists()     # a dry run builds nothing
    # the dry run does open the checkpoints: a wrong prefix is caught before any work
    assert main(["sweep", "-c", str(REPRO / name), "--dry_run", "--no-progress", "--prefix", "visual.",
                 "--encoder", json.dumps(tiny_open_clip["encoder"])]) == 2
    assert "no key starts with prefix 'visual.'" in capsys.readouterr().err


def _hf_folders(cfg: dict) -> None:
    """FusionBench's layout: θ0 a full CLIPModel folder, the fine-tunes CLIPVisionModel folders."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8, projection_dim=16)
    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=8, projection_dim=16, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)
    torch.manual_seed(0)
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    full.save_pretrained(cfg["pretrained"])
    for i, path in enumerate(cfg["finetuned"].values()):
        ft = CLIPVisionModel(CLIPVisionConfig(**vision))
        inner = getattr(ft, "vision_model", ft)   # transformers 4 nests the tower, 5 does not
        inner.load_state_dict(full.vision_model.state_dict())
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        ft.save_pretrained(path)


@pytest.mark.parametrize("name", [n for n in SWEEPS if _load(n)["encoder"]["kind"] == "hf_clip"])
def test_hf_sweep_configs_dry_run_as_is(name, tmp_path, monkeypatch, capsys):
    """The FusionBench config needs no override: its folders are read as they are named."""
    pytest.importorskip("transformers")
    cfg = _load(name)
    monkeypatch.chdir(tmp_path)
    _hf_folders(cfg)
    _write_heads(Path(cfg["heads_dir"]), cfg["finetuned"], 16)
    assert main(["sweep", "-c", str(REPRO / name), "--dry_run", "--no-progress"]) == 0
    assert f"dry run: {len(cfg['finetuned'])} tasks" in capsys.readouterr().out


def test_tinting_config_fits_two_steps(tiny_open_clip, tmp_path, monkeypatch):
    """The Model Tinting recipe on a store of two tasks with MNIST / KMNIST in torchvision's layout."""
    name = "tinting_vitb32_8.yaml"
    cfg = _load(name)
    args = cfg["model"]["init_args"]
    monkeypatch.chdir(tmp_path)
    tasks = ["MNIST", "KMNIST"]
    for t in tasks:  # torchvision's raw idx files: 0, 0, ubyte, ndim, big-endian dims, data
        for split, n in (("train", 20), ("t10k", 12)):
            for kind, arr in (("images-idx3", np.full((n, 28, 28), 7 * n, np.uint8)),
                              ("labels-idx1", (np.arange(n) % 10).astype(np.uint8))):
                f = Path("data", t, "raw", f"{split}-{kind}-ubyte")
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.tobytes())
    visual = tiny_open_clip["visual"]
    Path(args["pretrained"]).parent.mkdir(parents=True)
    save_safetensors(visual, Path(args["pretrained"]))
    fts = {}
    for i, t in enumerate(tasks):
        g = torch.Generator().manual_seed(i + 1)
        fts[t] = str(save_safetensors({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in visual.items()},
                                      tmp_path / f"{t}.safetensors"))
    quantize_to_store(args["pretrained"], fts, args["store"], StoreConfig(scheme="tvq", bits=4), progress=False)
    _write_heads(Path(args["heads_dir"]), tasks, TINY["embed_dim"])
    enc = tiny_open_clip["encoder"]
    rc = main(["fit", "-c", str(REPRO / name), "--trainer.max_steps", "2", "--trainer.accelerator", "cpu",
               "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
               "--model.init_args.encoder.init_args.model_name", enc["model_name"],
               "--model.init_args.encoder.init_args.config", enc["config"],
               "--data.init_args.tasks", json.dumps(tasks), "--data.init_args.model_name", enc["model_name"],
               "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
               "--data.init_args.format", "torchvision"])
    assert rc == 0
    out = Path(cfg["trainer"]["default_root_dir"])
    assert Path(args["coefficients_out"]).is_file()
    assert {p.name for p in Path(args["heads_out"]).iterdir()} == {f"{t}.safetensors" for t in tasks}
    assert any(out.rglob("report.md"))
