"""CLIPSuiteDataModule on tiny stand-ins written in the real datasets' layouts (nothing downloads):
MNIST's idx files, CIFAR-10's pickled batches, DTD's class folders, RESISC45 with its split
lists, and a saved Hugging Face DatasetDict."""
from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from tvq_lightning.data.zoo.datamodule import CLIPSuiteDataModule, resolve_tasks
from tvq_lightning.data.zoo.sources import read_source
from tvq_lightning.data.zoo.splits import partition, split_file
from tvq_lightning.errors import TvqError

RAW = T.PILToTensor()   # uint8 (3, H, W): pixel values survive, so images can be identified


# -- writers of the real layouts ------------------------------------------------------------------
def write_idx(path: Path, arr: np.ndarray) -> None:
    """An idx file (MNIST's format): 0, 0, type 0x08 (ubyte), ndim, big-endian int32 dims, data."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.tobytes())


def write_mnist(root: Path, n_train: int = 50, n_test: int = 20, shift: int = 0) -> dict[str, np.ndarray]:
    """``root/MNIST/raw``: image i is filled with the value i; labels (i + shift) % 10."""
    labels = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 28, 28))
        labels[split] = (np.arange(n) + shift) % 10
        write_idx(root / "MNIST" / "raw" / f"{split}-images-idx3-ubyte", images)
        write_idx(root / "MNIST" / "raw" / f"{split}-labels-idx1-ubyte", labels[split])
    return labels


def write_cifar10(root: Path, per_batch: int = 6, n_test: int = 8) -> None:
    """``root/cifar-10-batches-py``: pickled dicts, ``data`` (N, 3072) uint8 and ``labels``; image i = value i."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    start = 0
    for name, n in [(f"data_batch_{b}", per_batch) for b in range(1, 6)] + [("test_batch", n_test)]:
        values = np.arange(start, start + n) % 256
        data = np.repeat(values.astype(np.uint8)[:, None], 3072, axis=1)
        batch = {"batch_label": name, "data": data, "labels": [int(v) % 10 for v in values],
                 "filenames": [f"{v}.png" for v in values]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        start = 0 if name.startswith("data_batch_5") else start + n
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def write_png(path: Path, value: int, mode: str = "RGB", size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value if mode == "L" else (value, value, value)).save(path)


def write_folders(base: Path, splits: dict[str, int], classes=("banded", "blotchy", "braided")) -> None:
    """``base/<split>/<class>/<k>.png``; the pixel value is 10 * class + k."""
    for split, per_class in splits.items():
        for c, name in enumerate(classes):
            for k in range(per_class):
                write_png(base / split / name / f"{k}.png", 10 * c + k, mode="L" if k % 2 else "RGB")


def write_resisc45(root: Path, classes=("airplane", "airport", "beach"), per_class: int = 10) -> dict[str, list[str]]:
    """``root/resisc45/NWPU-RESISC45/<class>/<class>_<k>.jpg`` and the three split lists."""
    lists: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for c, name in enumerate(classes):
        for k in range(per_class):
            fname = f"{name}_{k:03d}.png"   # the lists name files; png keeps pixel values exact
            write_png(root / "resisc45" / "NWPU-RESISC45" / name / fname, 10 * c + k)
            lists["train" if k < 6 else "val" if k < 8 else "test"].append(fname)
    for split, names in lists.items():
        (root / "resisc45" / f"resisc45-{split}.txt").write_text("\n".join(names) + "\n")
    return lists


def write_hf(path: Path, n_train: int = 30, n_test: int = 10, num_classes: int = 43) -> None:
    """A ``DatasetDict`` (train, test) of ``image`` / ``label`` saved with ``save_to_disk``; image i = value i."""
    import datasets

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=num_classes)})

    def part(n: int, offset: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"image": [Image.new("RGB", (9, 9), (offset + i,) * 3) for i in range(n)],
                                           "label": [(offset + i) % num_classes for i in range(n)]}, features=feats)
    datasets.DatasetDict({"train": part(n_train, 0), "test": part(n_test, 100)}).save_to_disk(str(path))


def value(x: torch.Tensor) -> int:
    assert x.shape[0] == 3 and x.dtype == torch.uint8 and bool((x == x[0, 0, 0]).all())
    return int(x[0, 0, 0])


# -- tests ----------------------------------------------------------------------------------------
def test_mnist_idx_round_trip_and_split_file(tmp_path):
    labels = write_mnist(tmp_path / "data")
    dm = CLIPSuiteDataModule(["mnist"], root=str(tmp_path / "data"), transform=RAW, split_dir=str(tmp_path / "splits"))
    assert dm.tasks == ["MNIST"] and dm.num_classes("MNIST") == 10
    test = dm.split("MNIST", "test")
    assert len(test) == 20
    for i in range(20):
        x, y = test[i]
        assert value(x) == i and y == labels["t10k"][i]
    expected = partition(50)   # task_vectors: val = min(int(0.1 n), 5000) = 5, by randperm(seed 0)
    train, val = dm.split("MNIST", "train"), dm.split("MNIST", "val")
    train_ids = [value(train[i][0]) for i in range(len(train))]
    val_ids = [value(val[i][0]) for i in range(len(val))]
    assert train_ids == expected.train.tolist() and val_ids == expected.val.tolist()
    assert len(val_ids) == 5 and not set(train_ids) & set(val_ids) and set(train_ids) | set(val_ids) == set(range(50))
    assert [val[i][1] for i in range(5)] == labels["train"][val_ids].tolist()
    path = split_file(tmp_path / "splits", "MNIST")
    saved = json.loads(path.read_text())
    assert saved["val"] == val_ids and saved["num_samples"] == 50 and saved["test"] is None
    # a second run reads the file (a hand-edited one proves it is not recomputed)
    saved["train"], saved["val"] = saved["train"][1:], saved["val"] + saved["train"][:1]
    path.write_text(json.dumps(saved))
    again = CLIPSuiteDataModule("MNIST", root=str(tmp_path / "data"), transform=RAW, split_dir=str(tmp_path / "splits"))
    assert len(again.split("MNIST", "val")) == 6


def test_split_file_refused_when_dataset_or_settings_change(tmp_path):
    write_mnist(tmp_path / "data")
    kw = dict(root=str(tmp_path / "data"), transform=RAW, split_dir=str(tmp_path / "splits"))
    CLIPSuiteDataModule(["MNIST"], **kw).split("MNIST", "val")
    with pytest.raises(TvqError, match="val_fraction=0.1 \\(asked 0.2\\)") as e:
        CLIPSuiteDataModule(["MNIST"], val_fraction=0.2, **kw).split("MNIST", "val")
    assert "\n" not in str(e.value)
    write_mnist(tmp_path / "data", shift=1)   # same size, other labels
    with pytest.raises(TvqError, match="MNIST_split.json was made for another training set") as e:
        CLIPSuiteDataModule(["MNIST"], **kw).split("MNIST", "train")
    assert "delete" in str(e.value) and "\n" not in str(e.value)


def test_task_vectors_mnist_val_indices():
    """task_vectors asserts its MNISTVal training part starts with index 36044."""
    split = partition(60000)
    assert split.train[0] == 36044 and len(split.val) == 5000 and len(split.train) == 55000


def test_cifar10_batches_and_loader_shapes(tmp_path):
    write_cifar10(tmp_path)
    dm = CLIPSuiteDataModule(["cifar10"], root=str(tmp_path), transform="clip_224", batch_size=4,
                             split_dir=str(tmp_path / "splits"))
    raw = read_source("CIFAR10", tmp_path)
    assert raw.kind == "torchvision" and raw.classes[:2] == ["airplane", "automobile"]
    assert len(raw.train) == 30 and len(raw.test) == 8
    assert [int(np.asarray(raw.test[i][0])[0, 0, 0]) for i in range(8)] == list(range(8))
    (val,), (test,) = dm.val_dataloader(), dm.test_dataloader()
    batches = list(test)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 224, 224), (4, 3, 224, 224)]
    assert torch.cat([y for _, y in batches]).tolist() == list(range(8))
    x, y = next(iter(val))
    assert x.shape == (3, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_image_folder_layout_val_folder_is_test(tmp_path):
    """task_vectors' dtd/{train,val}: val holds the test images; validation comes out of train."""
    write_folders(tmp_path / "dtd", {"train": 10, "val": 2})
    dm = CLIPSuiteDataModule(["DTD"], root=str(tmp_path), transform=RAW, split_dir=str(tmp_path / "s"))
    test = dm.split("DTD", "test")
    assert sorted((value(x), y) for x, y in (test[i] for i in range(len(test)))) == \
        [(0, 0), (1, 0), (10, 1), (11, 1), (20, 2), (21, 2)]
    train, val = dm.split("DTD", "train"), dm.split("DTD", "val")
    assert (len(train), len(val)) == (27, 3)
    seen = [value(ds[i][0]) for ds in (train, val) for i in range(len(ds))]
    assert sorted(seen) == sorted(10 * c + k for c in range(3) for k in range(10))
    assert all(ds[i][1] == value(ds[i][0]) // 10 for ds in (train, val) for i in range(len(ds)))


def test_resisc45_split_lists(tmp_path):
    lists = write_resisc45(tmp_path)
    raw = read_source("resisc45", tmp_path)
    assert raw.kind == "folder" and raw.classes == ["airplane", "airport", "beach"]
    dm = CLIPSuiteDataModule(["NWPU-RESISC45"], root=str(tmp_path), transform=RAW, split_dir=str(tmp_path / "s"))
    test = dm.split("RESISC45", "test")
    assert [value(test[i][0]) for i in range(len(test))] == [8, 9, 18, 19, 28, 29]
    assert [test[i][1] for i in range(len(test))] == [0, 0, 1, 1, 2, 2]
    n_train = len(lists["train"])   # the papers carve val out of the train list (the val list is unused)
    assert len(dm.split("RESISC45", "train")) + len(dm.split("RESISC45", "val")) == n_train == 18


def test_hf_saved_dataset(tmp_path):
    write_hf(tmp_path / "gtsrb")
    dm = CLIPSuiteDataModule(["gtsrb"], root=str(tmp_path), format="hf", transform=RAW, split_dir=str(tmp_path / "s"))
    assert dm.raw("GTSRB").kind == "hf" and dm.num_classes("GTSRB") == 43
    test = dm.split("GTSRB", "test")
    assert [(value(test[i][0]), test[i][1]) for i in range(10)] == [(100 + i, (100 + i) % 43) for i in range(10)]
    val = dm.split("GTSRB", "val")
    assert len(val) == 3 and all(val[i][1] == value(val[i][0]) for i in range(3))


def test_missing_task_folder_is_one_line(tmp_path):
    dm = CLIPSuiteDataModule(["MNIST", "RESISC45"], root=str(tmp_path), split_dir=str(tmp_path / "s"))
    with pytest.raises(TvqError) as e:
        dm.val_dataloader()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("MNIST: ") and str(tmp_path / "MNIST" / "raw") in msg
    assert "download=True" in msg and "ylecun/mnist" in msg
    with pytest.raises(TvqError) as e:
        dm.split("RESISC45", "test")
    msg = str(e.value)
    assert "\n" not in msg and "resisc45/NWPU-RESISC45/<class>" in msg and "download=True" not in msg
    assert f"datasets.load_dataset('tanganke/resisc45').save_to_disk('{tmp_path / 'resisc45'}')" in msg


def test_suites_expand_in_order():
    eight = resolve_tasks("8")
    assert eight == ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"]
    assert resolve_tasks(14)[8:] == ["PCAM", "CIFAR100", "STL10", "OxfordIIITPet", "Flowers102", "FER2013"]
    twenty = resolve_tasks("20")
    assert len(twenty) == 20 and twenty[:14] == resolve_tasks("14")
    assert twenty[14:] == ["CIFAR10", "Food101", "RenderedSST2", "EMNIST", "FashionMNIST", "KMNIST"]
    assert resolve_tasks(["stanford-cars", "pets", "emnist_digits"]) == ["Cars", "OxfordIIITPet", "EMNIST"]
    assert resolve_tasks("mnist, dtd") == ["MNIST", "DTD"]
    with pytest.raises(TvqError, match="twice"):
        resolve_tasks(["cars", "StanfordCars"])


def test_grey_images_become_rgb_and_format_is_honoured(tmp_path):
    write_folders(tmp_path / "dtd", {"train": 10, "test": 2})
    dm = CLIPSuiteDataModule(["DTD"], root=str(tmp_path), transform=RAW, split_dir=str(tmp_path / "s"))
    assert all(dm.split("DTD", "test")[i][0].shape == (3, 12, 12) for i in range(6))   # half of them are mode L
    with pytest.raises(TvqError, match="DTD: .*dtd/dtd not found"):
        CLIPSuiteDataModule(["DTD"], root=str(tmp_path), format="torchvision").split("DTD", "test")


def test_lightning_cli_arguments_parse(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(CLIPSuiteDataModule, "data")
    cfg = parser.parse_args(["--data.tasks=8", f"--data.root={tmp_path}", "--data.transform=clip_224",
                             "--data.format=folder", "--data.max_val=100"])
    dm = parser.instantiate(cfg).data
    assert dm.tasks[0] == "SUN397" and len(dm.tasks) == 8 and dm.format == "folder" and dm.max_val == 100
    cfg = parser.parse_args(["--data.tasks=[MNIST, cifar10]", f"--data.root={tmp_path}"])
    assert parser.instantiate(cfg).data.tasks == ["MNIST", "CIFAR10"]


def test_class_folders_named_like_the_catalog_follow_its_order(tmp_path):
    """EuroSAT's catalog order is the sorted folder names; named by the catalog's class names
    (another sort order), the folders still get the catalog's labels."""
    from tvq_lightning.data.zoo.catalog import get_task

    names = list(get_task("EuroSAT").classnames)
    for i, name in enumerate(names):
        write_png(tmp_path / "eurosat" / "train" / name.replace(" ", "_") / "0.png", i)
        write_png(tmp_path / "eurosat" / "test" / name.replace(" ", "_") / "0.png", i)
    assert sorted(n.replace(" ", "_") for n in names) != [n.replace(" ", "_") for n in names]
    dm = CLIPSuiteDataModule(["EuroSAT"], root=str(tmp_path), transform=RAW, split_dir=str(tmp_path / "s"))
    test = dm.split("EuroSAT", "test")
    assert all(test[i][1] == value(test[i][0]) for i in range(len(test)))
