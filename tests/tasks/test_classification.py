"""The classification task type against direct references: loss, objective, metrics, confidence,
pseudo-targets, the keep rule and its pseudo-target loss, heads, batches."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from tvq_lightning.errors import TvqError
from tvq_lightning.models.heads import ClassificationHead
from tvq_lightning.tasks import create_task_type, softmax_entropy

TT = create_task_type("classification")


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(50, 7, generator=g) * 3, torch.randint(0, 7, (50,), generator=g)


def test_loss_and_adaptation_objective(data):
    logits, labels = data
    assert torch.equal(TT.loss(logits, labels), F.cross_entropy(logits, labels))
    p = logits.softmax(-1)
    ref = -(p * p.log()).sum(-1)
    assert torch.allclose(softmax_entropy(logits), ref, atol=1e-5)
    assert torch.allclose(TT.adaptation_objective(logits), ref.mean(), atol=1e-6)


def test_metrics_score_and_batch_metrics(data):
    logits, labels = data
    head = ClassificationHead(torch.randn(7, 4))
    metrics = TT.metrics(head)
    assert list(metrics) == ["acc"]
    for a, b in ((0, 20), (20, 50)):                       # two batches
        TT.update_metrics(metrics, logits[a:b], labels[a:b])
    want = (logits.argmax(-1) == labels).float().mean()
    ref = MulticlassAccuracy(num_classes=7, average="micro")(logits, labels)
    assert float(metrics["acc"].compute()) == pytest.approx(float(want)) == pytest.approx(float(ref))
    correct, n = TT.score(logits, labels)
    assert (correct, n) == (int((logits.argmax(-1) == labels).sum()), 50)
    assert torch.equal(TT.batch_metrics(logits, labels)["acc"], want)


def test_predict_confidence_and_pseudo_targets(data):
    logits, _ = data
    conf, label = logits.softmax(-1).max(-1)
    assert torch.equal(TT.predict(logits), logits.argmax(-1))
    for y, c in (TT.confidence(logits), TT.pseudo_targets(logits)):
        assert torch.equal(y, label) and torch.equal(c, conf)


def test_keep_rule_and_pseudo_target_loss(data):
    logits, _ = data
    y_m, c_m = TT.confidence(logits)
    y_e = torch.where(torch.arange(50) % 3 == 0, (y_m + 1) % 7, y_m)     # a third disagree
    c_e = torch.linspace(0, 1, 50)
    keep = TT.keep(y_e, c_e, logits)
    assert torch.equal(keep, (y_e == y_m) | (c_e >= c_m))
    assert 0 < int(keep.sum()) < 50
    assert torch.equal(TT.pseudo_target_loss(logits, y_e, keep), F.cross_entropy(logits[keep], y_e[keep]))


def test_heads_and_batches(tmp_path):
    head = ClassificationHead(torch.randn(3, 5), torch.randn(3), normalize=False)
    TT.save_head(head, tmp_path / "h.safetensors")
    loaded = TT.load_head(tmp_path / "h.safetensors")
    assert torch.equal(loaded.weight, head.weight) and TT.head_outputs(loaded) == 3 and TT.feature_dim(loaded) == 5
    rebuilt = TT.head_from_state({"weight": head.weight, "bias": head.bias}, TT.head_config(head))
    assert rebuilt.normalize is False and torch.equal(rebuilt.bias, head.bias)
    with pytest.raises(TvqError, match="has 3 classes but the data gives 4"):
        TT.check_head("t", head, 4, "the data")
    x, y = torch.randn(4, 5), torch.arange(4)
    assert TT.inputs((x, y)) is x and TT.targets((x, y)) is y and TT.batch_size((x, y)) == 4
    idx = torch.arange(4)
    assert TT.unlabelled((idx, x)) == (idx, x) and TT.unlabelled(x) == (None, x)
    z = torch.randn(2, 5)
    assert torch.equal(TT.map_features(lambda v: 2 * v, z), 2 * z)
