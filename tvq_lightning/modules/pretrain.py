"""Contrastive (CLIP) pre-training of a :class:`~tvq_lightning.models.tiny_clip.TinyClip`.

The recipe of the shipped embedded-benchmark θ0 (``configs/pretrain_tiny_clip.yaml``): symmetric
InfoNCE over a batch of image-caption pairs with a learnable temperature (clamped at 100), pairs
whose captions are identical masked out as negatives, AdamW with linear warm-up and cosine decay,
and an exponential moving average of the weights. At the end of fitting the EMA weights are
written with :func:`~tvq_lightning.models.tiny_clip.save_tiny_clip` to ``export_dir`` (with the
recipe and the data generator's version in ``config.json``). ``Trainer.predict`` returns, per
batch of image-caption pairs, the normalised embeddings of the (EMA) model:
``{"image_embeds": (B, D), "text_embeds": (B, D)}``.
"""
from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.embedded.generate import GENERATOR_VERSION, MEAN, STD
from ..models.tiny_clip import TinyClip, save_tiny_clip


def clip_loss(img: Tensor, txt: Tensor, scale: Tensor, ids: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE of normalised embeddings; pairs with equal ``ids`` are not negatives."""
    logits = scale * img @ txt.T
    if ids is not None:
        same = (ids[:, None] == ids[None, :]) & ~torch.eye(len(ids), dtype=torch.bool, device=ids.device)
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class ContrastivePretraining(pl.LightningModule):
    """CLIP pre-training with EMA weights.

    Args:
        model: the CLIP to train (a ``class_path``, e.g. ``tvq_lightning.models.tiny_clip.TinyClip``).
        lr, weight_decay: AdamW settings (no decay on norms, biases, embeddings and the temperature).
        warmup_steps: linear warm-up before the cosine decay to 0 at ``trainer.max_steps``.
        ema_decay: the EMA's decay per step (0 disables it: the final weights are exported).
        export_dir: where to write the (EMA) weights at the end of fitting; None: nowhere.
    """

    def __init__(self, model: TinyClip, lr: float = 1e-3, weight_decay: float = 0.05, warmup_steps: int = 50,
                 ema_decay: float = 0.998, export_dir: str | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.ema = copy.deepcopy(model).requires_grad_(False) if ema_decay > 0 else None

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, tokens, ids = batch
        x = images.permute(0, 3, 1, 2).float().div_(255.0).sub_(MEAN).div_(STD)
        return x, tokens, ids

    def training_step(self, batch, batch_idx):
        images, tokens, ids = batch
        img, txt, scale = self.model(images, tokens)
        loss = clip_loss(img, txt, scale, ids)
        with torch.no_grad():
            acc = ((img @ txt.T).argmax(1) == torch.arange(len(img), device=img.device)).float().mean()
        self.log_dict({"train/loss": loss, "train/i2t_acc": acc, "train/scale": scale}, prog_bar=True)
        return loss

    def predict_step(self, batch, batch_idx) -> dict[str, Tensor]:
        """The (EMA) model's normalised image and caption embeddings of a batch of pairs."""
        images, tokens, _ = batch
        img, txt, _ = (self.ema if self.ema is not None else self.model)(images, tokens)
        return {"image_embeds": img, "text_embeds": txt}

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
            if self.ema is not None:
                d = self.hparams.ema_decay
                for e, p in zip(self.ema.parameters(), self.model.parameters()):
                    e.lerp_(p, 1 - d)
                for e, b in zip(self.ema.buffers(), self.model.buffers()):
                    e.copy_(b)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.hparams.lr)
        total = max(int(self.trainer.max_steps), 1) if self.trainer.max_steps > 0 else \
            int(self.trainer.estimated_stepping_batches)
        warm = min(self.hparams.warmup_steps, max(total // 10, 1))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(total - warm, 1))))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor),
                                                   "interval": "step"}}

    def on_fit_end(self) -> None:
        if self.hparams.export_dir is None or not self.trainer.is_global_zero:
            return
        recipe = {k: self.hparams[k] for k in ("lr", "weight_decay", "warmup_steps", "ema_decay")}
        dm = self.trainer.datamodule
        recipe.update(steps=int(self.trainer.global_step), batch_size=getattr(dm, "batch_size", None),
                      num_samples=getattr(dm, "num_samples", None), data_seed=getattr(dm, "seed", None),
                      generator_version=GENERATOR_VERSION)
        save_tiny_clip(self.ema if self.ema is not None else self.model, self.hparams.export_dir, {"recipe": recipe})
