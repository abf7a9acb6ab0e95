"""Contrastive pre-training of the tiny CLIP: the loss, the optimiser set-up, EMA and the export."""
import json
import math
import types
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from tvq_lightning.data.embedded import GENERATOR_VERSION, caption_pairs, to_tensor
from tvq_lightning.data.embedded.datamodules import CaptionPairs
from tvq_lightning.models.tiny_clip import TinyClip, load_tiny_clip
from tvq_lightning.modules.pretrain import ContrastivePretraining, clip_loss

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
QUIET = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
         "enable_model_summary": False}
SMALL = {"channels": (8, 8, 16, 16), "width": 32, "embed_dim": 16, "text_width": 32, "text_heads": 2,
         "text_layers": 1}


def small_clip() -> TinyClip:
    torch.manual_seed(0)
    return TinyClip(**SMALL)


def reference_loss(img, txt, scale, ids=None) -> float:
    """Symmetric InfoNCE written out term by term, in float64; equal ids are left out of the denominators."""
    n = len(img)
    logits = (scale * img @ txt.T).double()
    total = 0.0
    for m in (logits, logits.T):
        for i in range(n):
            keep = [j for j in range(n) if ids is None or j == i or ids[j] != ids[i]]
            total += -(m[i, i] - torch.logsumexp(m[i, keep], 0)).item()
    return total / (2 * n)


def embeddings(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_clip_loss_is_symmetric_cross_entropy():
    img, txt = embeddings()
    scale = torch.tensor(7.0)
    assert clip_loss(img, txt, scale).item() == pytest.approx(reference_loss(img, txt, 7.0), rel=1e-5)
    # symmetric in its two towers
    assert clip_loss(txt, img, scale).item() == pytest.approx(clip_loss(img, txt, scale).item(), rel=1e-6)
    unique = torch.arange(6)
    assert clip_loss(img, txt, scale, unique).item() == pytest.approx(clip_loss(img, txt, scale).item(), rel=1e-6)


def test_clip_loss_masks_equal_captions_as_negatives():
    img, txt = embeddings()
    scale = torch.tensor(7.0, requires_grad=True)
    ids = torch.tensor([0, 1, 0, 2, 1, 3])
    masked = clip_loss(img, txt, scale, ids)
    assert torch.isfinite(masked)
    assert masked.item() == pytest.approx(reference_loss(img, txt, 7.0, ids.tolist()), rel=1e-5)
    assert masked.item() < clip_loss(img, txt, scale).item()  # fewer negatives in every denominator
    masked.backward()
    assert torch.isfinite(scale.grad)
    # all captions equal: no negatives at all, so nothing to contrast
    all_same = torch.zeros(6, dtype=torch.long)
    assert clip_loss(img, txt, scale, all_same).item() == pytest.approx(0.0, abs=1e-6)


def test_clip_loss_perfect_alignment():
    z = torch.eye(8)
    assert clip_loss(z, z, torch.tensor(100.0)).item() < 1e-6
    assert clip_loss(z, z, torch.tensor(1.0)).item() > 1.0
    assert clip_loss(z, z.roll(1, 0), torch.tensor(100.0)).item() > 50  # every pair mismatched


def test_batches_are_normalised_like_to_tensor(tmp_path, monkeypatch):
    monkeypatch.setenv("TVQ_CACHE_DIR", str(tmp_path))
    module = ContrastivePretraining(small_clip(), ema_decay=0)
    images = caption_pairs(4)[0]
    tokens, ids = torch.ones(4, 20, dtype=torch.long), torch.arange(4)
    x, t, i = module.on_after_batch_transfer((torch.from_numpy(images), tokens, ids), 0)
    torch.testing.assert_close(x, to_tensor(images))
    assert t is tokens and i is ids


def test_optimiser_groups_and_schedule():
    module = ContrastivePretraining(small_clip(), lr=0.01, weight_decay=0.1, warmup_steps=5, ema_decay=0)
    module.trainer = types.SimpleNamespace(max_steps=100)
    cfg = module.configure_optimizers()
    decay, no_decay = cfg["optimizer"].param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in module.model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed | kept == set(names.values()) and not decayed & kept
    assert {"logit_scale", "text.token_embedding.weight", "text.positional_embedding"} <= kept
    assert "visual.top.fc.weight" in decayed and "visual.stem.0.0.weight" in decayed
    assert not any(n.endswith(".bias") or ".ln" in n for n in decayed)
    factor = cfg["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert cfg["lr_scheduler"]["interval"] == "step"
    assert [factor(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factor(5 + 95 // 2) == pytest.approx(0.5, abs=0.02) and factor(100) == pytest.approx(0.0, abs=1e-12)
    module.trainer = types.SimpleNamespace(max_steps=20)
    warm = module.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert warm(0) == pytest.approx(0.5)  # warm-up is capped at a tenth of the run


class Snapshots(pl.Callback):
    """The trained weights after each optimiser step (before the module's own batch-end hook)."""

    def __init__(self):
        self.states = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.states.append([p.detach().clone() for p in module.model.parameters()])


def test_fit_keeps_an_ema_clamps_the_scale_and_exports(tmp_path, monkeypatch):
    monkeypatch.setenv("TVQ_CACHE_DIR", str(tmp_path / "cache"))
    model = small_clip()
    with torch.no_grad():
        model.logit_scale.fill_(5.0)  # above the clamp at log(100)
    initial = [p.detach().clone() for p in model.parameters()]
    decay, steps = 0.6, 6
    module = ContrastivePretraining(model, lr=3e-3, warmup_steps=2, ema_decay=decay, export_dir=str(tmp_path / "out"))
    snaps = Snapshots()
    pl.seed_everything(0)
    trainer = pl.Trainer(max_steps=steps, callbacks=[snaps], **QUIET)
    trainer.fit(module, CaptionPairs(num_samples=64, batch_size=16))
    assert trainer.global_step == steps and len(snaps.states) == steps
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())

    assert model.logit_scale.item() <= math.log(100) + 1e-6
    # the EMA is the running average of the (clamped) weights after every step
    expected = [p.clone() for p in initial]
    for state in snaps.states:
        for e, (name, _), p in zip(expected, model.named_parameters(), state):
            e.lerp_(p.clamp(0, math.log(100)) if name == "logit_scale" else p, 1 - decay)
    for (name, ema), e in zip(module.ema.named_parameters(), expected):
        torch.testing.assert_close(ema, e, msg=name)
        assert not ema.requires_grad
    moved = [n for (n, ema), final, init in zip(module.ema.named_parameters(), model.parameters(), initial)
             if not torch.equal(ema, final) and not torch.equal(ema, init)]
    assert "visual.top.fc.weight" in moved and "text.token_embedding.weight" in moved

    loaded = load_tiny_clip(tmp_path / "out")
    for (name, v), ref in zip(loaded.state_dict().items(), module.ema.state_dict().values()):
        assert torch.equal(v, ref.half().float()), name
    recipe = json.loads((tmp_path / "out" / "config.json").read_text())["recipe"]
    assert recipe == {"lr": 3e-3, "weight_decay": 0.05, "warmup_steps": 2, "ema_decay": decay, "steps": steps,
                      "batch_size": 16, "num_samples": 64, "data_seed": 0, "generator_version": GENERATOR_VERSION}


def test_fit_without_ema_exports_the_trained_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TVQ_CACHE_DIR", str(tmp_path / "cache"))
    model = small_clip()
    module = ContrastivePretraining(model, warmup_steps=1, ema_decay=0, export_dir=str(tmp_path / "out"))
    assert module.ema is None
    initial = model.visual.top.fc.weight.detach().clone()
    pl.Trainer(max_steps=2, **QUIET).fit(module, CaptionPairs(num_samples=32, batch_size=16))
    assert not torch.equal(model.visual.top.fc.weight, initial)
    loaded = load_tiny_clip(tmp_path / "out")
    for (name, v), ref in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(v, ref.half().float()), name
    none = ContrastivePretraining(small_clip(), ema_decay=0)  # export_dir=None: nothing is written
    pl.Trainer(max_steps=1, **QUIET).fit(none, CaptionPairs(num_samples=16, batch_size=16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out"]
