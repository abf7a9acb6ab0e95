"""BatchNorm running-statistics policies of a merged encoder: each checked against a direct computation."""
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from tvq_lightning.data.multitask import ToyTasks
from tvq_lightning.errors import TvqError
from tvq_lightning.merging.bn_stats import (bn_stat_keys, bn_statistics, recompute_bn_stats, store_bn_statistics,
                                            train_image_batches)
from tvq_lightning.models.heads import ClassificationHead
from tvq_lightning.store import StoreConfig, quantize_to_store

warnings.filterwarnings("ignore", ".*does not have many workers.*")
TASKS = ["a", "b"]


class BNEncoder(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> pooled (B, 8); plus decoys that are not BatchNorm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.norm_b = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.ln = nn.LayerNorm(8)
        self.register_buffer("running_mean", torch.zeros(8))   # a decoy named like a BN buffer

    def forward(self, x):
        return self.ln(self.norm_b(self.conv(self.stem(x))).mean((2, 3)) + self.running_mean)


def _randomised(seed: int, base: dict | None = None, scale: float = 0.1) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = BNEncoder().state_dict() if base is None else base
    out = {}
    for k, v in sd.items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif base is None:
            out[k] = (torch.rand(v.shape, generator=g) + 0.5) if k.endswith("running_var") else torch.randn(v.shape, generator=g)
        else:
            out[k] = v + scale * torch.randn(v.shape, generator=g)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bn")
    pre = _randomised(0)
    fts = {t: _randomised(i + 1, pre) for i, t in enumerate(TASKS)}
    quantize_to_store(pre, fts, root / "store", StoreConfig("fp32"), progress=False)
    return root, pre, fts


def _encoder(pre) -> BNEncoder:
    enc = BNEncoder()
    enc.load_state_dict(pre)
    return enc


def _heads():
    g = torch.Generator().manual_seed(5)
    return {t: ClassificationHead(torch.randn(3, 8, generator=g)) for t in TASKS}


def _dm():
    return ToyTasks(TASKS, num_classes=3, image_size=8, train_size=24, val_size=8, test_size=8, batch_size=8)


def test_keys_by_module_type():
    assert bn_stat_keys(BNEncoder()) == ["stem.1.running_mean", "stem.1.running_var",
                                         "norm_b.running_mean", "norm_b.running_var"]


def test_pure_policies_exact(setup):
    _, pre, fts = setup
    keys = bn_stat_keys(BNEncoder())
    taus = {k: [fts[t][k] - pre[k] for t in TASKS] for k in keys}
    merged = {k: pre[k] + 7 for k in keys}
    for k, v in bn_statistics("merged", keys, pre, taus, merged).items():
        assert torch.equal(v, merged[k])
    for k, v in bn_statistics("pretrained", keys, pre).items():
        assert torch.equal(v, pre[k])
    for k, v in bn_statistics("mean", keys, pre, taus).items():
        torch.testing.assert_close(v, (fts["a"][k] + fts["b"][k]) / 2)
    for k, v in store_bn_statistics("mean", keys, pre, setup[0] / "store").items():
        torch.testing.assert_close(v, (fts["a"][k] + fts["b"][k]) / 2)
    assert store_bn_statistics("merged", keys, pre, None) is None
    with pytest.raises(TvqError, match="bn_stats='bogus'"):
        bn_statistics("bogus", keys, pre)
    with pytest.raises(TvqError, match="needs store"):
        store_bn_statistics("mean", keys, pre, None)


def test_recompute_is_cumulative_average_and_leaves_encoder_alone(setup):
    _, pre, _ = setup
    enc = _encoder(pre).train()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    batches = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    params = {k: v * 1.5 for k, v in enc.named_parameters()}
    stats = recompute_bn_stats(enc, batches, num_batches=2, params=params)
    with torch.no_grad():   # directly: the first BN sees conv(x) with the given weights
        acts = [nn.functional.conv2d(x, params["stem.0.weight"], params["stem.0.bias"], padding=1) for x in batches[:2]]
    want_mean = torch.stack([a.mean((0, 2, 3)) for a in acts]).mean(0)
    want_var = torch.stack([a.transpose(0, 1).reshape(4, -1).var(1, unbiased=True) for a in acts]).mean(0)
    torch.testing.assert_close(stats["stem.1.running_mean"], want_mean)
    torch.testing.assert_close(stats["stem.1.running_var"], want_var)
    assert set(stats) == set(bn_stat_keys(enc))
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    assert enc.training and enc.stem[1].momentum == 0.1
    with pytest.raises(TvqError, match="no images"):
        recompute_bn_stats(enc, [])


@pytest.mark.parametrize("policy", ["merged", "pretrained", "mean", "recompute"])
def test_merged_evaluation_policies(setup, policy):
    from tvq_lightning.modules.evaluate import MergedEvaluation

    root, pre, fts = setup
    keys = bn_stat_keys(BNEncoder())
    m = MergedEvaluation(_encoder(pre), heads=_heads(), store=str(root / "store"), method="task_arithmetic",
                         method_options={"scaling": 0.5}, bn_stats=policy, bn_batches=2)
    sd = m.model.encoder.state_dict()
    torch.testing.assert_close(sd["conv.weight"], pre["conv.weight"] + 0.5 * sum(fts[t]["conv.weight"] - pre["conv.weight"]
                                                                                  for t in TASKS))
    if policy == "recompute":
        dm = _dm()
        pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   limit_test_batches=1).test(m, datamodule=dm)
        ref = MergedEvaluation(_encoder(pre), heads=_heads(), store=str(root / "store"), method="task_arithmetic",
                               method_options={"scaling": 0.5})
        want = recompute_bn_stats(ref.model.encoder, train_image_batches(dm, TASKS, 2))
    else:
        want = {k: {"merged": pre[k] + 0.5 * sum(fts[t][k] - pre[k] for t in TASKS), "pretrained": pre[k],
                    "mean": (fts["a"][k] + fts["b"][k]) / 2}[policy] for k in keys}
    for k in keys:
        torch.testing.assert_close(m.model.encoder.state_dict()[k], want[k])


@pytest.mark.parametrize("checkpoint_tasks", [True, False])
def test_adamerging_mean_is_not_coefficient_weighted(setup, checkpoint_tasks):
    from tvq_lightning.modules.adamerging import AdaMerging

    root, pre, fts = setup
    given = _encoder(pre)
    m = AdaMerging(given, str(root / "store"), heads=_heads(), init=0.3, bn_stats="mean",
                   checkpoint_tasks=checkpoint_tasks).eval()
    keys = bn_stat_keys(given)
    assert not any(k in m.merged_params() for k in keys)
    assert all(torch.equal(given.state_dict()[k], pre[k]) for k in keys)            # the caller's encoder
    assert all(torch.equal(m.pretrained_tensors()[k], pre[k]) for k in keys)         # experts build on θ0
    want = {k: (fts["a"][k] + fts["b"][k]) / 2 if k in keys else
            (pre[k] + 0.3 * sum(fts[t][k] - pre[k] for t in TASKS) if pre[k].is_floating_point() else pre[k])
            for k in pre}
    ref = BNEncoder().eval()
    ref.load_state_dict(want)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(m.task_features([x])[0], ref(x))
    # the whole adapted encoder, for another copy of it: the policy's statistics included
    full = m.merged_state_dict()
    assert set(full) == set(pre)
    for k in pre:
        torch.testing.assert_close(full[k], want[k].to(full[k].dtype))
    other = BNEncoder().eval()   # θ0 buffers: merged_params() alone would keep them
    other.load_state_dict(pre)
    with torch.no_grad():
        torch.testing.assert_close(torch.func.functional_call(other, full, (x,)), ref(x))


def test_adamerging_recompute_at_test_start(setup):
    from tvq_lightning.modules.adamerging import AdaMerging

    root, pre, fts = setup
    m = AdaMerging(_encoder(pre), str(root / "store"), heads=_heads(), init=0.3, bn_stats="recompute", bn_batches=2)
    dm = _dm()
    pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
               limit_test_batches=1).test(m, datamodule=dm)
    merged = {k: pre[k] + 0.3 * sum(fts[t][k] - pre[k] for t in TASKS) if pre[k].is_floating_point() else pre[k]
              for k in pre}
    want = recompute_bn_stats(_encoder(merged), train_image_batches(dm, TASKS, 2))
    for k, v in want.items():
        torch.testing.assert_close(m.model.encoder.state_dict()[k], v)
