"""Dense scenes: determinism per seed, caching, the pre-training stream, the SceneTasks datamodule."""
import time

import numpy as np
import pytest
import torch

from tvq_lightning.data.scenes import generate as G
from tvq_lightning.data.scenes.datamodule import TASKS, SceneTasks
from tvq_lightning.data.scenes.sampling import CLASSES
from tvq_lightning.errors import TvqError


def test_generation_is_deterministic_and_chunked():
    a = G.generate((G.SCENES_VERSION, 0, "t"), 40, 32)
    b = G.generate((G.SCENES_VERSION, 0, "t"), 40, 32)
    assert all(np.array_equal(a[k], b[k]) for k in a) and set(a) == {"image", "label", "depth", "normal"}
    longer = G.generate((G.SCENES_VERSION, 0, "t"), 64, 32)
    assert np.array_equal(longer["image"][:G.CHUNK], a["image"][:G.CHUNK])   # a chunk does not depend on the total
    other = G.generate((G.SCENES_VERSION, 1, "t"), 40, 32)
    assert not np.array_equal(other["image"], a["image"])


def test_scene_split_cache_round_trip(cache, monkeypatch):
    z = G.scene_split("val", seed=0, size=8, image_size=32)
    assert z["image"].shape == (8, 32, 32, 3) and z["image"].dtype == np.uint8
    assert z["label"].dtype == np.int64 and z["depth"].dtype == np.float32 and z["normal"].shape == (8, 32, 32, 3)
    files = list(cache.glob("scenes-v*-seed0-val-8-32px.npz"))
    assert len(files) == 1
    assert not np.array_equal(G.scene_split("val", seed=1, size=8, image_size=32)["image"], z["image"])
    fresh = G.generate((G.SCENES_VERSION, 0, "scenes", "val"), 8, 32)
    monkeypatch.setattr(G, "generate", lambda *a, **k: pytest.fail("regenerated instead of loading the cache"))
    again = G.scene_split("val", seed=0, size=8, image_size=32)
    assert np.array_equal(again["image"], fresh["image"]) and np.array_equal(again["label"], fresh["label"])
    np.testing.assert_allclose(again["depth"], fresh["depth"], rtol=1e-3)
    np.testing.assert_allclose(again["normal"], fresh["normal"], atol=2e-3)
    valid = again["label"] >= 0
    np.testing.assert_allclose(np.linalg.norm(again["normal"][valid], axis=-1), 1.0, atol=1e-6)
    with pytest.raises(TvqError, match="unknown split"):
        G.scene_split("dev")


def test_pretrain_stream_labels_and_workers():
    x, y = G.pretrain_chunk(0, 3, n=8, image_size=32)
    assert x.shape == (8, 32, 32, 3) and y.shape == (8, len(G.PRETRAIN_LABELS)) and set(np.unique(y)) <= {0.0, 1.0}
    assert (y[:, :3].sum(1) >= 1).mean() > 0.5                           # most images show an object
    assert ((y[:, :3].sum(1) > 0) == (y[:, 3:].sum(1) > 0)).all()        # a visible object has a hue
    s = G.pretrain_stream(0, 8, 32, workers=0, start=3)
    x2, y2 = next(s)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)


def test_generation_speed_sanity(capsys):
    t = time.process_time()
    G.generate((G.SCENES_VERSION, 0, "speed"), 64, 64)
    with capsys.disabled():
        print(f"\nscene rendering: {64 / max(time.process_time() - t, 1e-9):.0f} images/s (64 x 64, one process)")


def test_scene_tasks_datamodule():
    dm = SceneTasks(train_size=16, val_size=8, test_size=12, image_size=32, batch_size=4, eval_batch_size=8,
                    train_task="depth")
    assert dm.tasks == list(TASKS) and [dm.num_classes(t) for t in TASKS] == [len(CLASSES), 1, 3]
    x, d = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and d.shape == (4, 1, 32, 32) and d.dtype == torch.float32
    loaders = dm.val_dataloader()
    assert len(loaders) == 3
    (xs, seg), (xd, depth), (xn, normal) = (next(iter(dl)) for dl in loaders)
    assert torch.equal(xs, xd) and torch.equal(xs, xn)                                 # the tasks share the images
    assert seg.shape == (8, 32, 32) and seg.dtype == torch.int64 and seg.min() >= -1 and seg.max() < len(CLASSES)
    assert normal.shape == (8, 3, 32, 32) and normal.dtype == torch.float32
    valid = seg >= 0
    assert torch.equal(depth[:, 0] > 0, valid) and torch.equal(normal.norm(dim=1) > 0.5, valid)
    adapt = SceneTasks(tasks=("segmentation", "normal"), train_size=4, val_size=4, test_size=12, image_size=32,
                       batch_size=4)
    batch = next(iter(adapt.train_dataloader()))
    batch = batch[0] if isinstance(batch, tuple) else batch
    assert set(batch) == {"segmentation", "normal"}
    idx, images = batch["normal"]
    assert idx.shape == (4,) and images.shape == (4, 3, 32, 32)
    with pytest.raises(TvqError, match="unknown scene task"):
        SceneTasks(tasks=("depth", "edges"))
