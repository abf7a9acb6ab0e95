"""NYUv2 datamodule on a tiny stand-in written in the preprocessed .npy layout."""
import numpy as np
import pytest
import torch

from tvq_lightning.data.nyuv2 import NYUV2_TASKS, NYUv2, write_standin


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_standin(tmp_path_factory.mktemp("nyu"), train=10, val=3, size=(16, 24))


def test_batches_per_task(root):
    dm = NYUv2(str(root), batch_size=4, eval_batch_size=2)
    assert dm.tasks == list(NYUV2_TASKS) and [dm.num_classes(t) for t in dm.tasks] == [13, 1, 3]
    (seg_x, seg_y), (d_x, d_y), (n_x, n_y) = (next(iter(ld)) for ld in dm.test_dataloader())
    assert seg_x.shape == (2, 3, 16, 24) and seg_x.dtype == torch.float32 and 0 <= seg_x.min() and seg_x.max() <= 1
    assert seg_y.shape == (2, 16, 24) and seg_y.dtype == torch.int64 and seg_y.min() >= -1 and seg_y.max() <= 12
    assert d_y.shape == (2, 1, 16, 24) and d_y.dtype == torch.float32 and (d_y == 0).any()
    assert n_y.shape == (2, 3, 16, 24)
    norms = n_y.norm(dim=1)
    assert torch.allclose(norms[norms > 0], torch.ones(()), atol=1e-5) and (norms == 0).any()
    raw = np.load(root / "val" / "image" / "0.npy")
    assert torch.equal(seg_x[0], torch.from_numpy(raw).permute(2, 0, 1))     # HWC on disk, CHW in batches
    assert torch.equal(seg_x, d_x) and torch.equal(d_x, n_x)                  # the same images for every task


def test_splits_deterministic_and_disjoint(root):
    dm = NYUv2(str(root), tasks=["depth"], val_fraction=0.3)
    train, val, test = (dm.split("depth", s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (7, 3, 3)
    assert not set(train.indices) & set(val.indices) and train.root.name == "train" and test.root.name == "val"
    assert NYUv2(str(root), tasks=["depth"], val_fraction=0.3).split("depth", "val").indices == val.indices
    idx, image = next(iter(dm.train_dataloader().iterables["depth"]))   # unlabelled adaptation batches: (indices, images)
    assert idx.dtype == torch.int64 and image.shape[1:] == (3, 16, 24)


def test_channels_first_and_uint8_accepted(tmp_path):
    root = write_standin(tmp_path, train=2, val=1, size=(8, 8))
    img = (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)
    np.save(root / "val" / "image" / "0.npy", np.moveaxis(img, -1, 0))
    np.save(root / "val" / "depth" / "0.npy", np.ones((8, 8), np.float32))
    x, y = NYUv2(str(root), tasks=["depth"]).split("depth", "test")[0]
    torch.testing.assert_close(x, torch.from_numpy(np.moveaxis(img, -1, 0)).float() / 255)
    assert y.shape == (1, 8, 8)
