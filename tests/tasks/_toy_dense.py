"""A toy per-pixel regression task type, defined only in the tests: the shape of the dense task types
to come (segmentation, depth, normals) without a model zoo.

- encoder: a tiny conv net giving a ``(B, C, H, W)`` feature map (its blocks in a ModuleList, so
  AdaMerging's block-streamed merge applies);
- head: a small conv decoder ``(B, C, H, W) -> (B, 1, H, W)``, trained with the encoder when
  fine-tuning (``trains_head``), saved as safetensors;
- targets: ``(map, valid_mask)``; loss and metric: L1 over the valid pixels (``abs_err``, lower is
  better); adaptation objective: the map's mean squared spatial gradient (a smoothness prior);
- expert pseudo-target: the expert's map, with a per-pixel confidence; two maps agree where they
  differ by less than ``tol``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from torchmetrics import Metric

from tvq_lightning.data.multitask import MultiTaskDataModule
from tvq_lightning.tasks import MetricInfo, TaskType, masked_mean

NAME = "toy_depth"
SIZE = 12


class ConvEncoder(nn.Module):
    def __init__(self, width: int = 8, depth: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU()) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for blk in self.blocks:
            x = x + blk(x)
        return x


class ConvDecoder(nn.Module):
    def __init__(self, in_channels: int, hidden: int = 8):
        super().__init__()
        self.in_channels = in_channels
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, 1, 1)

    def forward(self, z: Tensor) -> Tensor:
        return self.out(F.relu(self.conv(z)))

    def save(self, path: str | Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> ConvDecoder:
        sd = load_file(str(path))
        head = cls(sd["conv.weight"].shape[1], sd["conv.weight"].shape[0])
        head.load_state_dict(sd)
        return head


class MaskedAbsError(Metric):
    """Mean |pred - target| over the valid pixels, summed states (all-reduced under DDP)."""

    higher_is_better = False

    def __init__(self):
        super().__init__()
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, outputs: Tensor, targets) -> None:
        total, count = abs_err_sums(outputs, targets)
        self.total += total
        self.count += count

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp_min(1)).float()


def abs_err_sums(outputs: Tensor, targets) -> tuple[Tensor, Tensor]:
    target, mask = targets
    err = (outputs - target).abs().mean(1)               # (B, H, W)
    valid = mask.to(err.dtype)
    return (err * valid).sum().double(), valid.sum().double()


class ToyDepth(TaskType):
    metric_infos = (MetricInfo("abs_err", higher_is_better=False),)
    trains_head = True

    def __init__(self, tol: float = 0.1):
        self.tol = tol

    def build_head(self, encoder, dataloader, num_outputs=None, **options):
        x = next(iter(dataloader))[0][:1]
        with torch.no_grad():
            channels = encoder(x.to(next(encoder.parameters()).device)).shape[1]
        return ConvDecoder(channels)

    def load_head(self, path):
        return ConvDecoder.load(path)

    def loss(self, outputs, targets):
        target, mask = targets
        return masked_mean((outputs - target).abs(), mask)

    def adaptation_objective(self, outputs):
        dy = outputs[..., 1:, :] - outputs[..., :-1, :]
        dx = outputs[..., :, 1:] - outputs[..., :, :-1]
        return dy.square().mean() + dx.square().mean()

    def batch_metrics(self, outputs, targets):
        total, count = abs_err_sums(outputs.detach(), targets)
        return {"abs_err": (total / count.clamp_min(1)).float()}

    def metrics(self, head):
        return {"abs_err": MaskedAbsError()}

    def score(self, outputs, targets):
        total, count = abs_err_sums(outputs, targets)
        return float(total), float(count)

    def predict(self, outputs):
        return outputs

    def pseudo_targets(self, outputs):
        return outputs, self._conf(outputs)

    def confidence(self, outputs):
        return outputs, self._conf(outputs)

    @staticmethod
    def _conf(outputs: Tensor) -> Tensor:
        """Per pixel: high where the map is locally flat (a stand-in for a predicted uncertainty)."""
        smooth = F.avg_pool2d(outputs, 3, stride=1, padding=1, count_include_pad=False)
        return torch.exp(-(outputs - smooth).abs().mean(1))

    def agree(self, a, b):
        return (a - b).abs().mean(1) < self.tol

    def pseudo_target_loss(self, outputs, target, keep):
        return masked_mean((outputs - target).abs(), keep)


class ToyMaps(MultiTaskDataModule):
    """Per-task per-pixel targets of generated images: ``(image, map, valid_mask)`` samples."""

    def __init__(self, tasks=("blur", "edge"), train_size: int = 64, test_size: int = 32, batch_size: int = 16,
                 train_task: str | None = None, seed: int = 0):
        super().__init__(tasks, batch_size, None, train_task, 0)
        self.sizes = {"train": train_size, "val": test_size, "test": test_size}
        self.seed = seed

    def make_split(self, task: str, split: str):
        t = self.tasks.index(task)
        g = torch.Generator().manual_seed(self.seed * 100 + t * 10 + ["train", "val", "test"].index(split))
        n = self.sizes[split]
        coarse = torch.randn(n, 3, SIZE // 4, SIZE // 4, generator=g)
        images = F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        images = images + 0.1 * torch.randn(n, 3, SIZE, SIZE, generator=g)
        if t % 2 == 0:
            target = F.avg_pool2d(images.mean(1, keepdim=True), 3, stride=1, padding=1)
        else:
            target = images[:, :1] - images[:, 2:3]
        mask = torch.rand(n, SIZE, SIZE, generator=g) > 0.1
        return TensorDataset(images, target, mask)
