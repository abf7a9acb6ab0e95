"""Linear probes on frozen, L2-normalised features, and heads from files."""
import pytest
import torch

from tvq_lightning.data import ToyTasks
from tvq_lightning.errors import TvqError
from tvq_lightning.models.heads import ClassificationHead
from tvq_lightning.models.probe import extract_features, fit_linear_probe, heads_from_files
from tvq_lightning.testing import TinyEncoder


def _encoder() -> TinyEncoder:
    torch.manual_seed(0)
    enc = TinyEncoder(width=32, depth=1, heads=2, patch=4, image=16, out_dim=16)
    with torch.no_grad():
        enc.proj.normal_(0, 32 ** -0.5)
    return enc


def _data(noise: float = 1.0) -> ToyTasks:
    return ToyTasks(tasks=("a", "b"), num_classes=4, image_size=16, train_size=128, val_size=64, noise=noise,
                    batch_size=32, train_task="a")


def test_probe_fits_and_is_deterministic():
    enc, dm = _encoder(), _data()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    head = fit_linear_probe(enc, dm.train_dataloader(), 4, steps=100)
    again = fit_linear_probe(enc, dm.train_dataloader(), 4, steps=100)
    assert torch.equal(head.weight, again.weight) and torch.equal(head.bias, again.bias)
    assert isinstance(head, ClassificationHead) and head.num_classes == 4 and head.normalize
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # encoder untouched
    x, y = extract_features(enc, dm.val_dataloader()[0])
    assert torch.allclose(x.norm(dim=-1), torch.ones(len(x)), atol=1e-5)
    acc = (head(x).argmax(-1) == y).float().mean()
    assert acc > 0.8


def test_probe_errors():
    enc, dm = _encoder(), _data()
    with pytest.raises(TvqError, match="num_classes=3"):
        fit_linear_probe(enc, dm.train_dataloader(), 3, steps=1)
    with pytest.raises(TvqError, match="labelled batches"):
        fit_linear_probe(enc, [torch.randn(2, 3, 16, 16)], 4, steps=1)
    with pytest.raises(TvqError, match="empty dataloader"):
        fit_linear_probe(enc, [], 4, steps=1)


def test_heads_from_files(tmp_path):
    head = ClassificationHead(torch.randn(5, 8), torch.randn(5))
    head.save(tmp_path / "a.safetensors")
    heads = heads_from_files({"a": tmp_path / "a.safetensors"})
    assert torch.equal(heads["a"].weight, head.weight) and torch.equal(heads["a"].bias, head.bias)
    with pytest.raises(TvqError, match="head file .*b.safetensors for task 'b' does not exist"):
        heads_from_files({"b": tmp_path / "b.safetensors"})
