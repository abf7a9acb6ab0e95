"""EmbeddedTasks (with and without a frozen precompute module), apply_frozen and CaptionPairs."""
import pytest
import torch
from torch import nn

from tvq_lightning.data.embedded import caption_pairs, task_split, to_tensor, vocabulary
from tvq_lightning.data.embedded.datamodules import (
    CaptionPairs,
    EmbeddedTasks,
    apply_frozen,
)
from tvq_lightning.errors import TvqError
from tvq_lightning.models.tiny_clip import WordTokenizer

SIZES = {"train_size": 24, "val_size": 12, "test_size": 18}


def frozen_stem() -> nn.Module:
    """A small conv stem with dropout: outputs are deterministic only in eval mode."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.GELU(), nn.Dropout(0.5))


def test_apply_frozen_is_eval_mode_batched_and_restores_training():
    stem = frozen_stem()
    images = task_split("shapes", "train", size=20)[0]
    out = apply_frozen(stem, images, batch_size=7)
    assert stem.training  # the module's mode is restored
    with torch.no_grad():
        expected = stem.eval()(to_tensor(images))
    assert out.shape == (20, 4, 8, 8) and not out.requires_grad
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(apply_frozen(stem, images, batch_size=512), expected)
    assert not stem.training  # (we set eval above); apply_frozen keeps it
    apply_frozen(stem, images)
    assert not stem.training


def test_embedded_tasks_images_and_labels():
    dm = EmbeddedTasks(("shapes", "digits"), seed=2, **SIZES)
    assert dm.tasks == ["shapes", "digits"] and dm.num_classes("shapes") == 6 and dm.num_classes("digits") == 10
    for split, n in (("train", 24), ("val", 12), ("test", 18)):
        x, y = dm.split("digits", split).tensors
        images, labels = task_split("digits", split, seed=2, size=n)
        torch.testing.assert_close(x, to_tensor(images))
        assert torch.equal(y, torch.from_numpy(labels))
    assert [len(loader.dataset) for loader in dm.test_dataloader()] == [18, 18]
    assert [len(loader.dataset) for loader in dm.val_dataloader()] == [12, 12]


def test_embedded_tasks_precompute_replaces_images_by_features():
    stem = frozen_stem()
    dm = EmbeddedTasks(("gratings", "counts"), precompute=stem, batch_size=5, train_task="counts", **SIZES)
    for task in ("gratings", "counts"):
        for split, n in (("train", 24), ("test", 18)):
            x, y = dm.split(task, split).tensors
            images, labels = task_split(task, split, size=n)
            assert x.shape == (n, 4, 8, 8)
            assert torch.equal(x, apply_frozen(stem, images)) and torch.equal(y, torch.from_numpy(labels))
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (5, 4, 8, 8) and yb.max() < dm.num_classes("counts")
    assert dm.split("counts", "train") is dm.split("counts", "train")  # computed once


def test_embedded_tasks_rejects_unknown_tasks():
    with pytest.raises(TvqError, match="unknown embedded task 'cars'"):
        EmbeddedTasks(("shapes", "cars"))
    with pytest.raises(TvqError, match="train_task 'digits' is not one of the tasks"):
        EmbeddedTasks(("shapes",), train_task="digits")


def test_caption_pairs_module_batches():
    dm = CaptionPairs(num_samples=40, seed=0, batch_size=16, context_length=20)
    dm.setup("fit")
    images, captions = caption_pairs(40, 0)
    ds = dm._train
    assert len(ds) == 40
    stored_images, tokens, ids = ds.tensors
    assert torch.equal(stored_images, torch.from_numpy(images)) and stored_images.dtype == torch.uint8
    assert torch.equal(tokens, WordTokenizer(vocabulary(), 20)(captions))
    for i in range(40):  # equal captions, and only those, share an id
        for j in range(40):
            assert (ids[i] == ids[j]).item() == (captions[i] == captions[j])
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and all(len(b) == 3 and b[0].shape == (16, 32, 32, 3) for b in batches)
    assert [b[0].shape[0] for b in batches] == [16, 16]  # the incomplete last batch is dropped
    again = list(dm.train_dataloader())
    assert all(torch.equal(a[2], b[2]) for a, b in zip(batches, again))  # the shuffle is seeded
    dm.setup("fit")
    assert dm._train is ds
