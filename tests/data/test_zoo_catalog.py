"""The task catalog: the 20 CLIP tasks' class names (label order) and templates, suites, aliases."""
from __future__ import annotations

import json
from importlib import resources

import pytest

from tvq_lightning.data.zoo import (
    SUITES,
    TaskInfo,
    TaskSpecError,
    UnknownTaskError,
    get_task,
    list_tasks,
    load_task_file,
)
from tvq_lightning.errors import TvqError

COUNTS = {"SUN397": 397, "Cars": 196, "RESISC45": 45, "EuroSAT": 10, "SVHN": 10, "GTSRB": 43, "MNIST": 10, "DTD": 47,
          "PCAM": 2, "CIFAR100": 100, "STL10": 10, "OxfordIIITPet": 37, "Flowers102": 102, "FER2013": 7,
          "CIFAR10": 10, "Food101": 101, "RenderedSST2": 2, "EMNIST": 10, "FashionMNIST": 10, "KMNIST": 10}
EIGHT = ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"]
FOURTEEN = EIGHT + ["PCAM", "CIFAR100", "STL10", "OxfordIIITPet", "Flowers102", "FER2013"]
TWENTY = FOURTEEN + ["CIFAR10", "Food101", "RenderedSST2", "EMNIST", "FashionMNIST", "KMNIST"]


def test_suites_in_order():
    assert list_tasks("8") == EIGHT and list_tasks("14") == FOURTEEN and list_tasks("20") == TWENTY
    assert list_tasks(8) == EIGHT  # a number is fine too
    assert [len(SUITES[s]) for s in ("8", "14", "20")] == [8, 14, 20]
    every = list_tasks()
    assert every[:20] == TWENTY and "EMNISTLetters" in every and len(every) == len(set(every))
    with pytest.raises(UnknownTaskError, match="unknown suite '9': choose one of 8, 14, 20"):
        list_tasks("9")


@pytest.mark.parametrize("name", list_tasks())
def test_every_task_is_well_formed(name):
    t = get_task(name)
    assert isinstance(t, TaskInfo) and t.name == name
    assert isinstance(t.classnames, tuple) and isinstance(t.templates, tuple)
    assert t.num_classes >= 2 and len(set(t.classnames)) == t.num_classes
    assert all(isinstance(c, str) and c.strip() == c and c for c in t.classnames)
    assert t.templates and all(tp.count("{}") == 1 and "{" not in tp.replace("{}", "") for tp in t.templates)
    assert len(set(t.templates)) == len(t.templates)
    assert t.source and len(t.source) > 20
    assert t.prompts(t.classnames[0])[0] == t.templates[0].format(t.classnames[0])


def test_known_class_counts():
    assert {n: get_task(n).num_classes for n in TWENTY} == COUNTS
    assert get_task("EMNISTLetters").classnames == tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def test_label_order_landmarks():
    """Spot checks of the label order against the datasets' own numbering."""
    digits = tuple(str(i) for i in range(10))
    assert get_task("MNIST").classnames == get_task("SVHN").classnames == get_task("EMNIST").classnames == digits
    euro = get_task("EuroSAT").classnames  # torchvision's folder-sorted order, CLIP's names
    assert euro == ("annual crop land", "forest", "brushland or shrubland", "highway or road",
                    "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
                    "residential buildings or homes or apartments", "river", "lake or sea")
    gtsrb = get_task("GTSRB").classnames
    assert gtsrb[0] == "red and white circle 20 kph speed limit" and gtsrb[14] == "stop"
    assert gtsrb[42].endswith("no passing for trucks has ended")
    cars = get_task("Cars").classnames
    assert cars[0] == "AM General Hummer SUV 2000" and cars[5] == "Acura Integra Type R 2001"
    assert cars[-1] == "smart fortwo Convertible 2012"
    sun = get_task("SUN397").classnames  # sorted flattened folders (task_vectors' heads): jail_cell < jail_indoor
    assert sun[0] == "abbey" and sun[-1] == "youth hostel"
    assert sun.index("jail cell") == 206 and sun.index("jail indoor") == 207
    assert get_task("DTD").classnames == tuple(sorted(get_task("DTD").classnames))
    res = get_task("RESISC45").classnames
    assert res[0] == "airplane" and res[-1] == "wetland" and list(res) == sorted(res)
    pets = get_task("pets").classnames  # list.txt class ids: case-insensitive alphabetical
    assert list(pets) == sorted(pets, key=str.lower) and pets[:2] == ("Abyssinian", "american bulldog")
    assert get_task("FER2013").classnames == ("angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral")
    assert get_task("PCAM").classnames == ("lymph node", "lymph node containing metastatic tumor tissue")
    assert get_task("RenderedSST2").classnames == ("negative", "positive")
    assert get_task("STL10").classnames[:3] == ("airplane", "bird", "car")
    for name in ("CIFAR100", "Food101"):  # the datasets' sorted folder / fine-label names, '_' written ' '
        names = [c.replace(" ", "_") for c in get_task(name).classnames]
        assert names == sorted(names)
    assert get_task("CIFAR100").classnames[1] == "aquarium fish"
    assert get_task("Food101").classnames[0] == "apple pie"


def test_against_torchvision_class_lists():
    """The class lists torchvision exposes without downloading anything."""
    tvd = pytest.importorskip("torchvision.datasets")
    assert get_task("FashionMNIST").classnames == tuple(tvd.FashionMNIST.classes)
    assert get_task("KMNIST").classnames == tuple(tvd.KMNIST.classes)
    assert list(get_task("EMNIST").classnames) == list(tvd.EMNIST.classes_split_dict["digits"])
    assert [c.split(" - ")[0] for c in tvd.MNIST.classes] == list(get_task("MNIST").classnames)
    letters = tvd.EMNIST.classes_split_dict["letters"]  # 'N/A' at 0, then a..z as labels 1..26
    assert [c.upper() for c in letters[1:]] == list(get_task("EMNISTLetters").classnames)
    flowers = getattr(tvd.Flowers102, "classes", None)
    if flowers:  # torchvision spells three of CLIP's names differently
        ours = get_task("Flowers102").classnames
        assert len(flowers) == len(ours) == 102
        differ = [i for i, (a, b) in enumerate(zip(flowers, ours)) if a != b]
        assert differ == [15, 59, 92], differ
    cifar10 = getattr(tvd.CIFAR10, "classes", None)
    if isinstance(cifar10, list):
        assert tuple(cifar10) == get_task("CIFAR10").classnames


@pytest.mark.parametrize("alias,name", [
    ("cars", "Cars"), ("StanfordCars", "Cars"), ("stanford-cars", "Cars"), ("stanford_cars", "Cars"),
    ("sun397", "SUN397"), ("resisc45", "RESISC45"), ("NWPU-RESISC45", "RESISC45"), ("eurosat", "EuroSAT"),
    ("pets", "OxfordIIITPet"), ("oxford-iiit-pet", "OxfordIIITPet"), ("OxfordPets", "OxfordIIITPet"),
    ("flowers", "Flowers102"), ("oxford_flowers102", "Flowers102"), ("dtd", "DTD"),
    ("DescribableTextures", "DTD"), ("PatchCamelyon", "PCAM"), ("sst2", "RenderedSST2"),
    ("rendered-sst2", "RenderedSST2"), ("fashion_mnist", "FashionMNIST"), ("emnist_letters", "EMNISTLetters"),
    ("Food101", "Food101"), ("fer2013", "FER2013"), ("  GTSRB ", "GTSRB"),
])
def test_aliases_case_insensitive(alias, name):
    assert get_task(alias).name == name


def test_unknown_task_suggests_close_matches():
    with pytest.raises(UnknownTaskError) as e:
        get_task("sun396")
    msg = str(e.value)
    assert "\n" not in msg and "unknown task 'sun396'" in msg and "did you mean SUN397?" in msg
    with pytest.raises(TvqError, match="did you mean CIFAR10 or CIFAR100"):
        get_task("cifar")
    with pytest.raises(TvqError, match="the catalog has SUN397, Cars"):
        get_task("imagenet-sketch")


def test_package_data_files_match_the_catalog():
    folder = resources.files("tvq_lightning.data.zoo").joinpath("classnames")
    files = sorted(e.name for e in folder.iterdir() if e.name.endswith(".json"))
    assert files == sorted(f"{n.lower()}.json" for n in list_tasks())
    for f in files:
        data = json.loads(folder.joinpath(f).read_text(encoding="utf-8"))
        assert set(data) == {"name", "aliases", "classnames", "templates", "source"}


def test_custom_task_file(tmp_path):
    p = tmp_path / "birds.json"
    p.write_text(json.dumps({"classnames": ["robin", "crow"], "templates": ["a photo of a {}, a bird."]}))
    t = load_task_file(p)
    assert t.name == "birds" and t.classnames == ("robin", "crow") and t.aliases == ()
    p.write_text(json.dumps({"name": "Birds2", "classnames": ["robin", "crow"]}))
    assert load_task_file(p).templates == ("a photo of a {}.",) and load_task_file(p).name == "Birds2"


@pytest.mark.parametrize("doc,match", [
    ({"classnames": ["a", "b"], "templates": ["a photo"]}, r"templates\[0\] 'a photo' has no '\{\}'"),
    ({"classnames": ["a", "b"], "templates": ["{} and {}"]}, "exactly one"),
    ({"classnames": ["a", "b"], "templates": ["a {} {"]}, "not a format string"),
    ({"classnames": [], "templates": ["{}"]}, "'classnames' must be a non-empty list"),
    ({"templates": ["{}"]}, "'classnames' must be a non-empty list"),
    ({"classnames": ["a", "a"]}, r"classnames\[1\] 'a' repeats classnames\[0\]"),
    ({"classnames": ["a", 3]}, r"classnames\[1\] must be a non-empty string"),
    ({"classnames": ["a", "b"], "templates": []}, "'templates' must be a non-empty list"),
    ({"classname": ["a", "b"]}, "unknown key 'classname' \\(did you mean 'classnames'\\?\\)"),
    (["a", "b"], "a task is a JSON object"),
])
def test_bad_custom_task(tmp_path, doc, match):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(TaskSpecError, match=match) as e:
        load_task_file(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_unreadable_custom_task(tmp_path):
    with pytest.raises(TaskSpecError, match="no such task file"):
        load_task_file(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text('{"classnames": ["a",')
    with pytest.raises(TaskSpecError, match=r"not valid JSON \(line 1"):
        load_task_file(tmp_path / "broken.json")
    with pytest.raises(TaskSpecError, match="is a directory"):
        load_task_file(tmp_path)
