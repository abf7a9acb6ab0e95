"""Generation of the embedded benchmark's splits and caption pairs: determinism, balance, caching."""
import numpy as np
import pytest
import torch

from tvq_lightning.data.embedded import (
    GENERATOR_VERSION,
    TASKS_VERSION,
    TASK_NAMES,
    TASKS,
    caption_pairs,
    task_split,
    to_tensor,
)
from tvq_lightning.data.embedded.generate import MEAN, STD, digits
from tvq_lightning.errors import TvqError


def fresh(monkeypatch, tmp_path, name: str) -> None:
    """Point the cache at a new empty folder, so the next call generates instead of reading."""
    monkeypatch.setenv("TVQ_CACHE_DIR", str(tmp_path / name))


@pytest.mark.parametrize("task", TASK_NAMES)
def test_task_split_shapes_and_balanced_labels(task):
    images, labels = task_split(task, "train", size=40)
    assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (40,) and labels.dtype == np.int64
    k = TASKS[task].num_classes
    counts = np.bincount(labels, minlength=k)
    assert len(counts) == k and counts.max() - counts.min() <= 1
    assert len({im.tobytes() for im in images}) == 40  # no two images alike


def test_task_split_is_deterministic_per_seed(monkeypatch, tmp_path):
    a = task_split("shapes", "train", seed=0, size=24)
    fresh(monkeypatch, tmp_path, "second")
    b = task_split("shapes", "train", seed=0, size=24)
    c = task_split("shapes", "train", seed=1, size=24)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_splits_and_tasks_differ():
    train, val, test = (task_split("counts", s, size=30)[0] for s in ("train", "val", "test"))
    assert not np.array_equal(train, val) and not np.array_equal(val, test) and not np.array_equal(train, test)
    assert not np.array_equal(task_split("colours", "train", size=30)[0], task_split("sizes", "train", size=30)[0])


def test_default_split_sizes_and_empty_split():
    images, labels = task_split("quadrants", "val", size=0)
    assert images.shape == (0, 32, 32, 3) and images.dtype == np.uint8 and labels.shape == (0,)
    from tvq_lightning.data.embedded import SPLIT_SIZES

    assert SPLIT_SIZES == {"train": 3000, "val": 200, "test": 400}


def test_bad_task_or_split_raises():
    with pytest.raises(TvqError, match="unknown embedded task 'cars'.*shapes"):
        task_split("cars", "train")
    with pytest.raises(TvqError, match="unknown split 'dev'.*train, val, test"):
        task_split("shapes", "dev")


def test_cache_file_is_keyed_and_read_back(cache):
    images, labels = task_split("sizes", "test", seed=3, size=20)
    path = cache / f"tasks-v{TASKS_VERSION}-seed3-sizes-test-20.npz"
    assert path.is_file()
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary file left behind
    # a second call reads the file: plant a marker in it
    np.savez(path, images=np.zeros_like(images), labels=labels + 100)
    again_images, again_labels = task_split("sizes", "test", seed=3, size=20)
    assert not again_images.any() and np.array_equal(again_labels, labels + 100)
    # another size, seed or split is another file
    task_split("sizes", "test", seed=3, size=21)
    task_split("sizes", "test", seed=4, size=20)
    task_split("sizes", "val", seed=3, size=20)
    assert len(list(cache.glob("*.npz"))) == 4


def test_corrupted_cache_file_is_regenerated(cache):
    images, labels = task_split("gratings", "train", size=16)
    path = next(cache.glob("*.npz"))
    path.write_bytes(b"not a zip file at all")
    again_images, again_labels = task_split("gratings", "train", size=16)
    assert np.array_equal(images, again_images) and np.array_equal(labels, again_labels)
    with np.load(path) as z:  # the file was rewritten whole
        assert np.array_equal(z["images"], images)


def test_caption_pairs_deterministic_and_cached(cache, monkeypatch, tmp_path):
    images, caps = caption_pairs(50, seed=0)
    assert images.shape == (50, 32, 32, 3) and images.dtype == np.uint8
    assert len(caps) == 50 and all(type(c) is str and c for c in caps)
    assert (cache / f"v{GENERATOR_VERSION}-seed0-pretrain-50.npz").is_file()
    cached_images, cached_caps = caption_pairs(50, seed=0)
    assert np.array_equal(images, cached_images) and cached_caps == caps
    fresh(monkeypatch, tmp_path, "second")
    regen_images, regen_caps = caption_pairs(50, seed=0)
    assert np.array_equal(images, regen_images) and regen_caps == caps
    other_images, other_caps = caption_pairs(50, seed=1)
    assert not np.array_equal(images, other_images) and other_caps != caps


def test_pretraining_data_differs_from_task_data():
    pre = {im.tobytes() for im in caption_pairs(60)[0]}
    for task in TASK_NAMES:
        assert not pre & {im.tobytes() for im in task_split(task, "train", size=20)[0]}


def test_digit_parts_partition_sklearn_digits():
    from sklearn.datasets import load_digits

    fit_x, fit_y = digits("fit")
    eval_x, eval_y = digits("eval")
    assert len(fit_y) == 1200 and len(eval_y) == 1797 - 1200
    assert fit_x.dtype == np.float32 and fit_y.dtype == np.int64 and fit_x.shape[1:] == (8, 8)
    full = load_digits()
    key = lambda x, y: sorted(im.tobytes() + bytes([lab]) for im, lab in zip(x.astype(np.float32), y))
    assert key(np.concatenate([fit_x, eval_x]), np.concatenate([fit_y, eval_y])) == key(full.images, full.target)
    # each part has every class, so the digits task can draw from either
    assert set(fit_y.tolist()) == set(eval_y.tolist()) == set(range(10))


def test_digit_task_uses_fit_digits_for_train_and_eval_digits_for_test(monkeypatch):
    from tvq_lightning.data.embedded import generate

    seen = []
    real = generate.digits
    monkeypatch.setattr(generate, "digits", lambda part: seen.append(part) or real(part))
    task_split("digits", "train", size=10)
    task_split("digits", "val", size=10)
    task_split("digits", "test", size=10)
    assert seen == ["fit", "eval", "eval"]


def test_to_tensor_layout_and_normalisation():
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    images[0, 0, 0] = (0, 255, 128)
    x = to_tensor(images)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    assert x[0, :, 0, 0].tolist() == pytest.approx([-2.0, 2.0, (128 / 255 - MEAN) / STD], abs=1e-6)
    expected = (torch.from_numpy(images.astype(np.float32)) / 255 - MEAN) / STD
    torch.testing.assert_close(x, expected.permute(0, 3, 1, 2))
    assert to_tensor(images[:, ::2]).shape == (3, 3, 16, 32)  # non-contiguous input
