"""Pre-train the dense benchmark's θ0: ``python -m tvq_lightning.data.scenes.pretrain --out DIR``.

Objective: multi-label presence classification (binary cross-entropy over
:data:`~.generate.PRETRAIN_LABELS`: which object types and which of 6 hue bins are visible) on
:data:`~.sampling.PRETRAIN_SPEC` scenes — untextured rooms, a lower camera, 1-4 objects, more noise —
so neither the objective nor the distribution is one of the benchmark's tasks. The network is smp's
``tu-resnet10t`` encoder (built with timm alone) with a global-average-pool + linear head, dropped at
export. Needs only torch, timm, numpy, safetensors and this repository.

Data: an initial pool of ``--pool`` images, then ``--fresh`` new images per step appended to a ring
buffer of ``--buffer`` images held on the device; each step draws ``--batch`` images from the filled
buffer (random horizontal flips). Images are rendered by ``--workers`` spawned processes; step ``s``
waits until the chunks it is due have arrived, so the data are the same at any generation speed.
AdamW, linear warm-up and cosine decay; with ``--time-budget`` the schedule's progress is
``max(step / steps, elapsed / budget)`` and training ends at progress 1 (steps done are recorded).
bf16 autocast and channels-last on CUDA. Output: see :func:`.encoder.save_encoder`.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..embedded.generate import MEAN, STD
from .encoder import ENCODER, PREFIX, save_encoder, timm_encoder
from .generate import CHUNK, PRETRAIN_LABELS, PRETRAIN_VERSION, pretrain_chunk, pretrain_stream
from .sampling import PRETRAIN_SPEC


class PresenceNet(nn.Module):
    """The encoder and a linear presence head on its pooled deepest features."""

    def __init__(self):
        super().__init__()
        self.encoder = timm_encoder(ENCODER)
        self.head = nn.Linear(self.encoder.feature_info.channels()[-1], len(PRETRAIN_LABELS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)[-1].mean((2, 3)))


def normalise(images: torch.Tensor) -> torch.Tensor:
    """``uint8 (B, H, W, 3)`` on any device -> ``float32 (B, 3, H, W)`` as the benchmark's ``to_tensor``."""
    return images.permute(0, 3, 1, 2).float().div(255.0).sub(MEAN).div(STD)


class RingBuffer:
    """Images and labels on ``device``: chunks appended in stream order, the oldest overwritten."""

    def __init__(self, capacity: int, image_size: int, device: torch.device):
        self.images = torch.zeros((capacity, image_size, image_size, 3), dtype=torch.uint8, device=device)
        self.labels = torch.zeros((capacity, len(PRETRAIN_LABELS)), device=device)
        self.added = 0

    def add(self, images: np.ndarray, labels: np.ndarray) -> None:
        cap = len(self.images)
        idx = torch.arange(self.added, self.added + len(images)) % cap
        self.images[idx.to(self.images.device)] = torch.from_numpy(images).to(self.images.device)
        self.labels[idx.to(self.images.device)] = torch.from_numpy(labels).to(self.images.device)
        self.added += len(images)

    def filled(self) -> int:
        return min(self.added, len(self.images))


def lr_at(progress: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` of training, then cosine decay to 0."""
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - warmup) / max(1e-9, 1.0 - warmup))))


@torch.no_grad()
def heldout_accuracy(model: nn.Module, seed: int, n: int, image_size: int, device: torch.device) -> float:
    """Per-label accuracy on ``n`` images of a stream the training never sees (seed ``seed + 1``)."""
    model.eval()
    chunks = [pretrain_chunk(seed + 1, i, CHUNK, image_size) for i in range(max(1, n // CHUNK))]
    x = torch.from_numpy(np.concatenate([c[0] for c in chunks])).to(device)
    y = torch.from_numpy(np.concatenate([c[1] for c in chunks])).to(device)
    pred = torch.cat([model(normalise(x[i:i + 256])) for i in range(0, len(x), 256)]) > 0
    model.train()
    return float((pred == (y > 0.5)).float().mean())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tvq_lightning.data.scenes.pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (weights.safetensors, weights.sha256, recipe.json)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=float, default=0.03, help="fraction of training spent warming up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--pool", type=int, default=2048, help="images rendered before the first step")
    p.add_argument("--fresh", type=int, default=16, help="new images per step (rounded to whole chunks over time)")
    p.add_argument("--buffer", type=int, default=262144, help="ring buffer capacity (images)")
    p.add_argument("--workers", type=int, default=0, help="rendering processes (0: render in this process)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds of training; the schedule ends by then")
    p.add_argument("--device", default="cpu")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--heldout", type=int, default=1024, help="held-out images scored at the end")
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    t_start = time.time()
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    stream = pretrain_stream(a.seed, CHUNK, a.image_size, a.workers)     # spawned workers: safe beside CUDA
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = PresenceNet().to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, **({"fused": True} if cuda else {}))
    needed = math.ceil(a.pool / CHUNK) * CHUNK + a.steps * a.fresh + 2 * CHUNK
    buf = RingBuffer(max(min(a.buffer, needed), a.pool), a.image_size, device)
    gen = torch.Generator(device=device).manual_seed(a.seed)
    pool_chunks = math.ceil(a.pool / CHUNK)
    t_gen = time.time()
    for _ in range(pool_chunks):
        buf.add(*next(stream))
    print(f"pool: {buf.added} images in {time.time() - t_gen:.1f} s ({a.workers} workers)", flush=True)
    t_train, wait, loss_sum, acc_sum, seen, step = time.time(), 0.0, 0.0, 0.0, 0, 0
    progress = 0.0
    while progress < 1.0:
        due = pool_chunks + (step * a.fresh) // CHUNK
        t0 = time.time()
        while buf.added < due * CHUNK:
            buf.add(*next(stream))
        wait += time.time() - t0
        for g in opt.param_groups:
            g["lr"] = a.lr * lr_at(progress, a.warmup)
        idx = torch.randint(0, buf.filled(), (a.batch,), device=device, generator=gen)
        x, y = normalise(buf.images[idx]), buf.labels[idx]
        flip = torch.rand(a.batch, device=device, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        elapsed = time.time() - t_train
        progress = max(step / a.steps, elapsed / a.time_budget if a.time_budget else 0.0)
        if step % a.log_every == 0 or progress >= 1.0:
            loss_sum, acc_sum = float(loss.detach()), float(((logits.detach() > 0) == (y > 0.5)).float().mean())
            seen = step * a.batch
            print(f"step {step}/{a.steps}  loss {loss_sum:.4f}  acc {acc_sum:.3f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{seen / elapsed:.0f} img/s  data wait {wait:.1f} s  buffer {buf.filled()}  {elapsed:.0f} s", flush=True)
    train_s = time.time() - t_train
    stream.close()
    acc = heldout_accuracy(model, a.seed, a.heldout, a.image_size, device)
    state = {PREFIX + k: v for k, v in model.encoder.state_dict().items()}
    recipe = {
        "objective": "multi-label presence classification, BCE with logits: " + ", ".join(PRETRAIN_LABELS)
                     + " (an object counts when at least 6 of 4096 pixels show it); head: GAP of the last stage + linear",
        "data": {"distribution": "PRETRAIN_SPEC (untextured floor and walls, no rugs or pictures, camera 0.5-1.2 m, "
                                 "1-4 objects, noise 0.04-0.12)", "spec": asdict(PRETRAIN_SPEC),
                 "generator_version": PRETRAIN_VERSION, "seed": a.seed, "image_size": a.image_size,
                 "initial_pool": pool_chunks * CHUNK, "fresh_per_step": a.fresh, "buffer": len(buf.images),
                 "images_rendered": buf.added, "augmentation": "horizontal flips",
                 "normalisation": {"mean": MEAN, "std": STD}},
        "steps": step, "steps_planned": a.steps, "batch": a.batch, "lr": a.lr, "weight_decay": a.weight_decay,
        "optimizer": "AdamW (no decay on norms and biases)", "schedule": f"linear warm-up {a.warmup:.0%} then cosine",
        "time_budget_s": a.time_budget, "seed": a.seed, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "precision": "bf16 autocast" if cuda else "fp32", "workers": a.workers,
        "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - t_start, 1),
        "data_wait_seconds": round(wait, 1), "final_train_loss": loss_sum, "heldout_label_accuracy": round(acc, 4),
        "torch": torch.__version__, "command": "python -m tvq_lightning.data.scenes.pretrain " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    out = save_encoder(state, a.out, recipe)
    print(f"done: {step} steps in {train_s:.0f} s, held-out label accuracy {acc:.3f}, wrote {out} "
          f"({time.time() - t_start:.0f} s in all)", flush=True)


if __name__ == "__main__":
    main()
