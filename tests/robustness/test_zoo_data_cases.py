"""The CLIP-suite data sources on the less common layouts and on damaged or wrong data: each
layout is a tiny stand-in written as the real dataset lies on disk, each failure one TvqError line."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from tvq_lightning.data.zoo.datamodule import CLIPSuiteDataModule, resolve_transform
from tvq_lightning.data.zoo.sources import read_source
from tvq_lightning.data.zoo.splits import load_or_make_split, split_file
from tvq_lightning.errors import TvqError

RAW = T.PILToTensor()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TVQ_CACHE_DIR", str(tmp_path / "cache"))


def png(path: Path, v: int, size: int = 6) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (v, v, v)).save(path, format="PNG")


def idx(path: Path, arr) -> None:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.tobytes())


def val(x: torch.Tensor) -> int:
    return int(x[0, 0, 0])


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_eurosat_torchvision_folder_holds_out_a_test_split(tmp_path):
    """torchvision's EuroSAT is one folder: test and val are 10 % each of it (the papers' 2,700 / 2,700)."""
    for c in range(10):
        for k in range(10):
            png(tmp_path / "eurosat" / "2750" / f"Class{c}" / f"Class{c}_{k}.png", 10 * c + k)
    dm = CLIPSuiteDataModule(["eurosat"], root=str(tmp_path), transform=RAW)
    parts = {s: dm.split("EuroSAT", s) for s in ("train", "val", "test")}
    assert {s: len(d) for s, d in parts.items()} == {"train": 80, "val": 10, "test": 10}
    ids = {s: {val(d[i][0]) for i in range(len(d))} for s, d in parts.items()}
    assert set.union(*ids.values()) == set(range(100)) and sum(map(len, ids.values())) == 100
    assert all(d[i][1] == val(d[i][0]) // 10 for d in parts.values() for i in range(len(d)))
    saved = json.loads(split_file(tmp_path / "cache" / "zoo" / "splits", "EuroSAT").read_text())
    assert sorted(saved["test"]) == sorted(dm.split_indices("EuroSAT").test.tolist()) and saved["hold_out_test"]


def test_eurosat_splits_folder_gives_its_own_val(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        for c in ("AnnualCrop", "Forest"):
            for k in range(n):
                png(tmp_path / "EuroSAT_splits" / split / c / f"{k}.png", k)
    dm = CLIPSuiteDataModule(["EuroSAT"], root=str(tmp_path), transform=RAW)
    assert [len(dm.split("EuroSAT", s)) for s in ("train", "val", "test")] == [8, 4, 6]
    assert dm.split_indices("EuroSAT") is None and not (tmp_path / "cache").exists()


def test_dtd_torchvision_partition_merges_train_and_val(tmp_path):
    base = tmp_path / "dtd" / "dtd"
    lines = {"train1": [], "val1": [], "test1": []}
    for c, name in enumerate(("banded", "bubbly")):
        for k in range(6):
            png(base / "images" / name / f"{name}_{k:04d}.jpg", 10 * c + k)   # PNG bytes; PIL reads by content
            lines["train1" if k < 2 else "val1" if k < 4 else "test1"].append(f"{name}/{name}_{k:04d}.jpg")
    (base / "labels").mkdir()
    for f, ls in lines.items():
        (base / "labels" / f"{f}.txt").write_text("\n".join(ls) + "\n")
    raw = read_source("DTD", tmp_path)
    assert raw.kind == "torchvision" and len(raw.train) == 8 and len(raw.test) == 4
    assert sorted(val(RAW(raw.test[i][0])) for i in range(4)) == [4, 5, 14, 15]
    assert [raw.test[i][1] for i in range(4)] == [0, 0, 1, 1]


def _sun397_partitions(root, classes):
    data = root / "SUN397"
    rows: dict[str, list[str]] = {"Training_01.txt": [], "Testing_01.txt": []}
    for c, cls in enumerate(classes):
        for k in range(4):
            rel = f"{cls}/sun_{c}{k}.jpg"
            png(data / rel.lstrip("/"), (10 * c + k) % 256, size=2)
            rows["Training_01.txt" if k < 3 else "Testing_01.txt"].append(rel)
    (data / "ClassName.txt").write_text("\n".join(classes) + "\n")
    (data / "Partitions").mkdir()
    for f, ls in rows.items():
        (data / "Partitions" / f).write_text("\n".join(ls) + "\n")


def test_sun397_partition_files(tmp_path):
    classes = ["/a/abbey", "/j/jail/indoor", "/j/jail_cell"]
    _sun397_partitions(tmp_path, classes)
    raw = read_source("sun397", tmp_path)
    assert raw.classes == classes and len(raw.train) == 9
    assert [(val(RAW(raw.test[i][0])), raw.test[i][1]) for i in range(3)] == [(3, 0), (13, 1), (23, 2)]


def test_sun397_class_name_order_is_brought_to_the_folder_order(tmp_path):
    """ClassName.txt puts jail/indoor (206) before jail_cell (207); the catalog (and the released
    heads) the other way round: the torchvision layout is relabelled, the folder layout is not."""
    classes = [f"/c/c{i:03d}" for i in range(397)]
    classes[206], classes[207] = "/j/jail/indoor", "/j/jail_cell"
    _sun397_partitions(tmp_path / "tv", classes)
    raw = read_source("SUN397", tmp_path / "tv", format="torchvision")
    assert raw.classes[206:208] == ["/j/jail_cell", "/j/jail/indoor"]
    files = raw.test.base.files          # the relabelled test split over the partition's files
    labels = {f.parent.name: int(y) for f, y in zip(files, raw.test.targets)}
    assert labels["indoor"] == 207 and labels["jail_cell"] == 206 and labels["c000"] == 0
    names = [f"c{i:03d}" for i in range(397)]
    names[206], names[207] = "c206_jail_cell", "c206_jail_indoor"
    for i, name in enumerate(names):
        png(tmp_path / "f" / "sun397" / "train" / name / "0.png", i % 256, size=2)
    for name in names[206:208]:
        png(tmp_path / "f" / "sun397" / "val" / name / "0.png", 1, size=2)
    raw = read_source("SUN397", tmp_path / "f", format="folder")
    assert raw.classes[206:208] == ["c206_jail_cell", "c206_jail_indoor"]
    assert [raw.test[i][1] for i in range(2)] == [206, 207]


def test_gtsrb_and_rendered_sst2_torchvision_layouts(tmp_path):
    g = tmp_path / "gtsrb"
    for c in range(2):
        for k in range(3):
            png(g / "GTSRB" / "Training" / f"{c:05d}" / f"{k:05d}_{c}.ppm", 10 * c + k)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for k in range(4):
        png(g / "GTSRB" / "Final_Test" / "Images" / f"{k:05d}.ppm", 50 + k)
        rows.append(f"{k:05d}.ppm;6;6;0;0;5;5;{k % 2}")
    (g / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    raw = read_source("GTSRB", tmp_path, format="torchvision")
    assert len(raw.train) == 6 and [raw.test[i][1] for i in range(4)] == [0, 1, 0, 1]
    for split in ("train", "test"):
        for c in ("negative", "positive"):
            for k in range(3):
                png(tmp_path / "rendered-sst2" / split / c / f"{k}.png", k)
    dm = CLIPSuiteDataModule(["SST2"], root=str(tmp_path), transform="clip_224", batch_size=6)
    x, y = next(iter(dm.test_dataloader()[0]))
    assert x.shape == (6, 3, 224, 224) and y.tolist() == [0, 0, 0, 1, 1, 1]


def test_emnist_letters_shift_and_wrong_split_is_caught(tmp_path):
    raw_dir = tmp_path / "EMNIST" / "raw"
    for split in ("train", "test"):
        idx(raw_dir / f"emnist-letters-{split}-images-idx3-ubyte", np.zeros((26, 4, 4)))
        idx(raw_dir / f"emnist-letters-{split}-labels-idx1-ubyte", np.arange(1, 27))
        idx(raw_dir / f"emnist-digits-{split}-images-idx3-ubyte", np.zeros((26, 4, 4)))
        idx(raw_dir / f"emnist-digits-{split}-labels-idx1-ubyte", np.arange(1, 27))   # digits go up to 9 only
    dm = CLIPSuiteDataModule(["EMNISTLetters", "EMNIST"], root=str(tmp_path), transform=RAW)
    test = dm.split("EMNISTLetters", "test")
    assert [test[i][1] for i in range(26)] == list(range(26)) and dm.num_classes("EMNISTLetters") == 26
    with pytest.raises(TvqError) as e:
        dm.split("EMNIST", "val")
    assert "labels 1..26, but the task has 10 classes" in one_line(e)


def test_fer2013_hf_copy_in_alphabetical_order_is_relabelled(tmp_path):
    import datasets

    alpha = ["angry", "disgusted", "fearful", "happy", "neutral", "sad", "surprised"]
    feats = datasets.Features({"jpg": datasets.Image(), "cls": datasets.ClassLabel(names=alpha)})
    part = datasets.Dataset.from_dict({"jpg": [Image.new("L", (4, 4), i) for i in range(7)], "cls": list(range(7))},
                                      features=feats)
    datasets.DatasetDict({"train": part, "test": part}).save_to_disk(str(tmp_path / "fer2013"))
    raw = read_source("FER2013", tmp_path)
    assert [raw.test[i][1] for i in range(7)] == [0, 1, 2, 3, 6, 4, 5]
    assert raw.classes == ["angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral"]


def test_download_is_opt_in_and_goes_through_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    calls = []

    def fake_download(self):
        calls.append(self.raw_folder)
        for split in ("train", "t10k"):
            idx(Path(self.raw_folder) / f"{split}-images-idx3-ubyte", np.zeros((20, 4, 4)))
            idx(Path(self.raw_folder) / f"{split}-labels-idx1-ubyte", np.arange(20) % 10)
    monkeypatch.setattr(tvd.MNIST, "download", fake_download)
    offline = CLIPSuiteDataModule(["MNIST"], root=str(tmp_path))
    offline.prepare_data()
    with pytest.raises(TvqError, match="download=True"):
        offline.split("MNIST", "test")
    assert not calls
    dm = CLIPSuiteDataModule(["MNIST"], root=str(tmp_path), download=True, transform=RAW)
    dm.prepare_data()
    assert calls and len(dm.split("MNIST", "test")) == 20


def test_damaged_split_files_are_refused(tmp_path):
    labels = np.arange(40) % 4
    load_or_make_split("T", labels, tmp_path)
    path = split_file(tmp_path, "T")
    data = json.loads(path.read_text())
    data["val"] = data["val"] + data["train"][:1]
    path.write_text(json.dumps(data))
    with pytest.raises(TvqError) as e:
        load_or_make_split("T", labels, tmp_path)
    assert "disjoint" in one_line(e)
    path.write_text("{not json")
    with pytest.raises(TvqError) as e:
        load_or_make_split("T", labels, tmp_path)
    assert "unreadable" in one_line(e) and str(path) in str(e.value)
    with pytest.raises(TvqError, match="too small"):
        load_or_make_split("U", np.zeros(5), tmp_path)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(tasks=["NoSuchTask"]), "no data source for task 'NoSuchTask'"),
    (dict(tasks=["MNIST"], format="zip"), "format 'zip' is not one of"),
    (dict(tasks=["MNIST"], transform="bilinear"), "unknown transform 'bilinear'"),
    (dict(tasks=["MNIST"], transform="open_clip"), "needs model_name"),
])
def test_bad_arguments_are_one_line(tmp_path, kwargs, needle):
    with pytest.raises(TvqError) as e:
        CLIPSuiteDataModule(root=str(tmp_path), **kwargs)
    assert needle in one_line(e)


def test_bad_layouts_are_one_line(tmp_path):
    with pytest.raises(TvqError) as e:
        read_source("RESISC45", tmp_path, format="torchvision")
    assert "RESISC45 has no torchvision layout" in one_line(e)
    png(tmp_path / "dtd" / "train" / "banded" / "0.png", 0)
    png(tmp_path / "dtd" / "test" / "zigzag" / "0.png", 0)
    with pytest.raises(TvqError) as e:
        read_source("DTD", tmp_path)
    assert "class folder 'zigzag' that the train folder lacks" in one_line(e)
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(TvqError) as e:
        read_source("CIFAR10", tmp_path)
    assert "data_batch_1 is missing" in one_line(e)
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"x": [1]}), "test": datasets.Dataset.from_dict(
        {"x": [1]})}).save_to_disk(str(tmp_path / "gtsrb"))
    with pytest.raises(TvqError) as e:
        read_source("GTSRB", tmp_path)
    assert "it needs an image column" in one_line(e)
    base = tmp_path / "resisc45"
    png(base / "NWPU-RESISC45" / "beach" / "beach_001.jpg", 0)
    (base / "resisc45-train.txt").write_text("beach_001.jpg\nbeach_002.jpg\n")
    (base / "resisc45-test.txt").write_text("beach_001.jpg\n")
    with pytest.raises(TvqError) as e:
        read_source("RESISC45", tmp_path)
    assert "beach_002.jpg is listed in the split file" in one_line(e)


def test_open_clip_transform_matches_clip_224_for_vit_b_32():
    pytest.importorskip("open_clip")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 260, 3), dtype=np.uint8))
    a = resolve_transform(None, "ViT-B-32", "openai")(img)
    b = resolve_transform("clip_224")(img)
    assert a.shape == b.shape == (3, 224, 224) and torch.allclose(a, b, atol=1e-5)
