"""DepthMetrics and NormalMetrics against direct references: validity masks, several updates = one,
all-invalid batches, the histogram median within one bin of torch.median."""
from __future__ import annotations

import math

import pytest
import torch

from tvq_lightning.metrics import DepthMetrics, NormalMetrics

from _metric_data import depth_batch, normal_batch  # noqa: E402


def depth_reference(preds, target) -> dict[str, float]:
    p, t = preds.flatten().tolist(), target.flatten().tolist()
    pairs = [(a, b) for a, b in zip(p, t) if b > 0]
    return {"abs_err": sum(abs(a - b) for a, b in pairs) / len(pairs),
            "rel_err": sum(abs(a - b) / b for a, b in pairs) / len(pairs)}


def normal_reference(preds, target) -> torch.Tensor:
    """Angles (degrees) of the valid pixels, computed another way: atan2(|p x t|, p . t)."""
    p, t = preds.double().movedim(1, -1).reshape(-1, 3), target.double().movedim(1, -1).reshape(-1, 3)
    valid = t.norm(dim=1) > 0
    p, t = p[valid], t[valid]
    return torch.rad2deg(torch.atan2(torch.linalg.cross(p, t).norm(dim=1), (p * t).sum(1)))


def _updates(metric, batches):
    for b in batches:
        metric.update(*b)
    return metric.compute()


@pytest.mark.parametrize("split", [False, True])
def test_depth_matches_reference(split):
    batches = [depth_batch(s) for s in range(3)] + [depth_batch(5, all_invalid=True)]
    preds, target = (torch.cat(x) for x in zip(*batches))
    out = _updates(DepthMetrics(), batches if split else [(preds, target)])
    for k, v in depth_reference(preds, target).items():
        assert float(out[k]) == pytest.approx(v, rel=1e-6), k


def test_depth_empty_and_shapes():
    out = _updates(DepthMetrics(), [depth_batch(0, all_invalid=True)])
    assert all(math.isnan(float(v)) for v in out.values())
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        DepthMetrics().update(torch.zeros(2, 1, 3, 3), torch.zeros(2, 3, 3))


@pytest.mark.parametrize("split", [False, True])
def test_normals_match_reference(split):
    batches = [normal_batch(s) for s in range(3)] + [normal_batch(5, all_invalid=True)]
    preds, target = (torch.cat(x) for x in zip(*batches))
    out = _updates(NormalMetrics(), batches if split else [(preds, target)])
    ang = normal_reference(preds, target)
    assert float(out["mean"]) == pytest.approx(float(ang.mean()), rel=1e-6)
    for key, th in (("within_11_25", 11.25), ("within_22_5", 22.5), ("within_30", 30.0)):
        assert float(out[key]) == pytest.approx(float((ang < th).double().mean()), rel=1e-6), key
    assert abs(float(out["median"]) - float(ang.median())) <= 0.01


@pytest.mark.parametrize("n", [1, 2, 1000, 20001])
def test_histogram_median_within_one_bin(n):
    """Random angles (random predictions against random targets) and exact ties alike."""
    g = torch.Generator().manual_seed(n)
    target = torch.randn(1, 3, 1, n, generator=g)
    preds = target + 0.5 * torch.randn(1, 3, 1, n, generator=g)
    if n == 2:
        preds = torch.cat([target[..., :1], -target[..., 1:]], -1)     # 0° and 180°: the bin edges
    for width in (0.01, 0.5):
        m = NormalMetrics(bin_width=width)
        m.update(preds, target)
        assert abs(float(m.compute()["median"]) - float(normal_reference(preds, target).median())) <= width + 1e-9


def test_zero_predictions_count_as_90_degrees_and_empty_is_nan():
    target = torch.nn.functional.normalize(torch.randn(2, 3, 4, 4), dim=1)
    out = _updates(NormalMetrics(), [(torch.zeros_like(target), target)])
    assert float(out["mean"]) == pytest.approx(90.0) and abs(float(out["median"]) - 90.0) <= 0.01
    out = _updates(NormalMetrics(), [normal_batch(1, all_invalid=True)])
    assert all(math.isnan(float(v)) for v in out.values())
    with pytest.raises(ValueError, match="bin_width"):
        NormalMetrics(bin_width=0)
