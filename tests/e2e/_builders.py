"""Builders of the end-to-end zoo test (tests/e2e/test_zoo_pipeline.py): published checkpoints as their
releases lay them out, tiny datasets in the real layouts, and a direct (Lightning-free) evaluation.

- :func:`write_task_vectors_release`: the task_vectors release around a tiny open_clip CLIP, written by a
  subprocess that imports the release's own ``src.modeling`` (this process never does): ``zeroshot.pt``
  (the pickled ``ImageEncoder``, text tower deleted), ``<Task>/finetuned.pt`` and ``head_<Task>.pt``;
  plus the full open_clip weights (text tower included) that ``tvq heads`` reads.
- :func:`write_fusionbench_release`: FusionBench's layout: θ0 as a full Hugging Face ``CLIPModel``
  folder (tokenizer and processor included), one ``CLIPVisionModel`` folder per task.
- :func:`write_labelled_data`: every layout of ``CLIPSuiteDataModule`` (MNIST idx files, CIFAR-10 python
  batches, DTD and EuroSAT class folders, RESISC45 split lists, a saved Hugging Face ``DatasetDict``),
  labelled by each task's fine-tuned model.
- :func:`malicious_pickle`: a torch file whose pickle names an allowed class and runs ``os.system``.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image

from tvq_lightning.data.zoo import get_task

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent


def _test_module(rel: str, name: str) -> ModuleType:
    """Another test file's module, loaded by path under a private name (its tests are not collected here)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TESTS / rel)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


_safe_pickle_tests = _test_module("store/test_safe_pickle.py", "_e2e_safe_pickle_tests")
_zoo_tests = _test_module("data/test_zoo_datamodule.py", "_e2e_zoo_datamodule_tests")
MODELING = _safe_pickle_tests.MODELING             # task_vectors' src/modeling.py
_g, _s, _torch_file = _safe_pickle_tests._g, _safe_pickle_tests._s, _safe_pickle_tests._torch_file

# ------------------------------------------------------------------------------------ task_vectors

OC_MODEL = "tvq-e2e-tiny-clip"
# open_clip's tokenizer has CLIP's 49408 words: the text tower needs them all (test_safe_pickle's
# TINY_CLIP has 1000, enough for pickles but not for zero-shot heads)
OC_CONFIG = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
             "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}

_MAKE_RELEASE = '''
import copy, json, sys
from pathlib import Path
import open_clip, torch
from safetensors.torch import save_file

out, tasks = Path(sys.argv[1]), json.loads(sys.argv[3])
cfg = out / (sys.argv[2] + ".json")
open_clip.add_model_config(cfg)
from src.modeling import ClassificationHead, ImageEncoder

torch.manual_seed(0)
enc = ImageEncoder(sys.argv[2], keep_lang=True)
save_file({k: v.detach().clone().contiguous() for k, v in enc.model.state_dict().items()}, out / "openclip_full.safetensors")
delattr(enc.model, "transformer")      # what task_vectors' ImageEncoder(keep_lang=False) keeps
torch.save(enc, out / "zeroshot.pt")
heads = {}
for i, (task, classes) in enumerate(tasks.items()):
    ft = copy.deepcopy(enc)
    g = torch.Generator().manual_seed(i + 1)
    with torch.no_grad():
        for p in ft.model.visual.parameters():
            p.add_(0.2 * p.std().nan_to_num(0).clamp_min(0.02) * torch.randn(p.shape, generator=g))
    (out / task).mkdir()
    torch.save(ft, out / task / "finetuned.pt")
    head = ClassificationHead(True, torch.randn(classes, 16, generator=g), torch.randn(classes, generator=g))
    torch.save(head, out / f"head_{task}.pt")
    heads[f"{task}.weight"], heads[f"{task}.bias"] = head.weight.detach().clone(), head.bias.detach().clone()
save_file(heads, out / "heads.ref.safetensors")
'''


def write_task_vectors_release(root: Path, tasks: dict[str, int]) -> Path:
    """``root/release``: the task_vectors files for ``tasks`` (``{task: number of classes}``), the open_clip
    config ``<OC_MODEL>.json``, the full weights ``openclip_full.safetensors`` and the heads' reference
    tensors ``heads.ref.safetensors``; written by a subprocess with the release's ``src`` on its path."""
    code = root / "code"
    (code / "src").mkdir(parents=True)
    (code / "src" / "__init__.py").write_text("")
    (code / "src" / "modeling.py").write_text(MODELING)
    out = root / "release"
    out.mkdir()
    (out / f"{OC_MODEL}.json").write_text(json.dumps(OC_CONFIG))
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", _MAKE_RELEASE, str(out), OC_MODEL, json.dumps(tasks)], env=env,
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


# ------------------------------------------------------------------------------------- FusionBench

HF_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=224,
                 patch_size=32, projection_dim=16)   # ViT-B/32's geometry: CLIPSuiteDataModule's clip_224 images fit
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _tokenizer(d: Path):
    """A CLIP BPE tokenizer over single letters (other characters are unknown words), written to ``d``."""
    from transformers import CLIPTokenizer

    toks = ["<|startoftext|>", "<|endoftext|>", *_LETTERS, *(c + "</w>" for c in _LETTERS)]
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(toks)}))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))


def write_fusionbench_release(root: Path, tasks: list[str]) -> dict[str, Path]:
    """``{"pretrained": CLIPModel folder, task: CLIPVisionModel folder, ...}``: θ0 with its text tower,
    tokenizer and processor (as ``openai/clip-vit-base-patch32``), each task a perturbed vision tower."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    tok = _tokenizer(root / "vocab")
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=48, projection_dim=16, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=HF_VISION, projection_dim=16)).eval()
    with torch.no_grad():
        full.logit_scale.fill_(2.0)
    out = {"pretrained": root / "clip-vit-tiny"}
    full.save_pretrained(out["pretrained"])
    tok.save_pretrained(out["pretrained"])
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(out["pretrained"])
    for i, task in enumerate(tasks):
        vision = CLIPVisionModel(CLIPVisionConfig(**HF_VISION))
        tower = getattr(vision, "vision_model", vision)
        tower.load_state_dict(copy.deepcopy(full.vision_model.state_dict()))
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in vision.parameters():
                p.add_(0.2 * p.std().nan_to_num(0).clamp_min(0.02) * torch.randn(p.shape, generator=g))
        out[task] = root / f"clip-vit-tiny_{task}"
        vision.save_pretrained(out[task])
    return out


# ------------------------------------------------------------------------------------------- data
#
# test_zoo_datamodule's writers fill every image with one grey value: a CLIP tower's features then hardly
# differ from image to image and every model predicts one class, so accuracies would say nothing. Here
# the images are random colour patterns, and every image is labelled with the prediction of its task's
# fine-tuned model and head: the individual model scores ~100 %, any other weights less, so a sweep that
# evaluates the wrong weights (or heads, or labels) shows it. The layouts are those of the real datasets.

#: where each task's data lies (CLIPSuiteDataModule's raw(task).kind)
LAYOUTS = {"MNIST": "torchvision", "CIFAR10": "torchvision", "DTD": "folder", "EuroSAT": "folder", "RESISC45": "folder",
           "GTSRB": "hf"}


def random_images(task: str, n: int, seed: int) -> list[np.ndarray]:
    """``n`` images: random grids of colours (2 x 2 to 8 x 8 cells, random contrast) plus noise
    (MNIST: grey 28 x 28, the others RGB 32 x 32)."""
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        cells = int(g.choice([2, 4, 8]))
        lo, hi = sorted(g.integers(0, 256, 2))
        grid = g.integers(lo, hi + 1, (cells, cells, 3)).repeat(32 // cells, 0).repeat(32 // cells, 1)
        img = np.clip(grid + g.normal(0, 20, grid.shape), 0, 255).astype(np.uint8)
        out.append(img[:28, :28].mean(-1).astype(np.uint8) if task == "MNIST" else img)
    return out


def diverse(images: list[np.ndarray], labels: list[int], n: int) -> tuple[list[np.ndarray], list[int]]:
    """``n`` of the images, taking the predicted classes in turn (rarest first) so that few images cover
    as many classes as the model predicts at all."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    queues = sorted(by_class.values(), key=len)
    pick: list[int] = []
    while len(pick) < n:
        for q in queues:
            if q and len(pick) < n:
                pick.append(q.pop(0))
    pick.sort()
    return [images[i] for i in pick], [labels[i] for i in pick]


def as_pil(arr: np.ndarray) -> Image.Image:
    """The image as its reader returns it (MNIST: mode L; the others: RGB)."""
    return Image.fromarray(arr)


@torch.no_grad()
def predict(encoder: torch.nn.Module, head: torch.nn.Module, transform, images: list[np.ndarray]) -> list[int]:
    """The labels ``head(encoder(transform(image)))`` predicts, images prepared as CLIPSuiteDataModule does."""
    from tvq_lightning.data.zoo.datamodule import to_rgb

    x = torch.stack([transform(to_rgb(as_pil(a))) for a in images])
    return head(encoder.eval()(x)).argmax(-1).tolist()


def _write_mnist(root: Path, splits) -> None:
    for name, (images, labels) in (("train", splits["train"]), ("t10k", splits["test"])):
        _zoo_tests.write_idx(root / "MNIST" / "raw" / f"{name}-images-idx3-ubyte", np.stack(images))
        _zoo_tests.write_idx(root / "MNIST" / "raw" / f"{name}-labels-idx1-ubyte", np.asarray(labels))


def _write_cifar10(root: Path, splits) -> None:
    """``cifar-10-batches-py``: the train images over data_batch_1..5, rows in CHW order."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images, labels = splits["train"]
    parts = [(f"data_batch_{b + 1}", idx) for b, idx in enumerate(np.array_split(np.arange(len(images)), 5))]
    for name, (imgs, labs) in [(n, ([images[i] for i in idx], [labels[i] for i in idx])) for n, idx in parts] + \
            [("test_batch", splits["test"])]:
        data = np.stack(imgs).transpose(0, 3, 1, 2).reshape(len(imgs), 3072)
        batch = {"batch_label": name, "data": data, "labels": [int(v) for v in labs],
                 "filenames": [f"{name}_{i}.png" for i in range(len(imgs))]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": list(get_task("CIFAR10").classnames)}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def _folder_names(task: str) -> list[str]:
    return [c.replace(" ", "_") for c in get_task(task).classnames]


def _write_dtd(root: Path, splits) -> None:
    """task_vectors' ``dtd/{train,val}/<class>/``, val holding the test images; every class folder in train."""
    names = _folder_names("DTD")
    for n in names:
        (root / "dtd" / "train" / n).mkdir(parents=True)
    for split, folder in (("train", "train"), ("test", "val")):
        images, labels = splits[split]
        for k, (img, y) in enumerate(zip(images, labels)):
            path = root / "dtd" / folder / names[y] / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            as_pil(img).save(path)


def _write_eurosat(root: Path, splits) -> None:
    """``eurosat/{train,test}/<class>/``, every class folder in train; the catalog's class order is not the
    folders' sorted order, so the reader must map folders to labels by name."""
    names = _folder_names("EuroSAT")
    assert sorted(names) != names
    for n in names:
        (root / "eurosat" / "train" / n).mkdir(parents=True)
    for split in ("train", "test"):
        for k, (img, y) in enumerate(zip(*splits[split])):
            path = root / "eurosat" / split / names[y] / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            as_pil(img).save(path)


def _write_resisc45(root: Path, splits) -> None:
    """``resisc45/NWPU-RESISC45/<class>/<class>_<k>.png`` and the split lists (the val list empty, as unused)."""
    names = _folder_names("RESISC45")
    base = root / "resisc45"
    for n in names:
        (base / "NWPU-RESISC45" / n).mkdir(parents=True)
    lists: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    k = 0
    for split in ("train", "test"):
        for img, y in zip(*splits[split]):
            fname = f"{names[y]}_{k:03d}.png"
            as_pil(img).save(base / "NWPU-RESISC45" / names[y] / fname)
            lists[split].append(fname)
            k += 1
    for split, files in lists.items():
        (base / f"resisc45-{split}.txt").write_text("".join(f + "\n" for f in files))


def _write_gtsrb(root: Path, splits) -> None:
    """A ``DatasetDict`` (train, test) of ``image`` / ``label`` written by ``save_to_disk`` at ``root/gtsrb``."""
    import datasets

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=43)})
    parts = {s: datasets.Dataset.from_dict({"image": [as_pil(a) for a in images], "label": list(labels)},
                                           features=feats) for s, (images, labels) in splits.items()}
    datasets.DatasetDict(parts).save_to_disk(str(root / "gtsrb"))


WRITERS = {"MNIST": _write_mnist, "CIFAR10": _write_cifar10, "DTD": _write_dtd, "EuroSAT": _write_eurosat,
           "RESISC45": _write_resisc45, "GTSRB": _write_gtsrb}


def write_labelled_data(root: Path, models: dict, transform, n_train: int = 20, n_test: int = 10) -> dict:
    """Every task of ``models`` (``{task: (encoder with its fine-tuned weights, head)}``) in its layout
    (:data:`LAYOUTS`) under ``root``, each image labelled by that model; ``{task: {split: labels}}``."""
    out = {}
    for i, (task, (encoder, head)) in enumerate(models.items()):
        splits = {}
        for j, (split, n) in enumerate((("train", n_train), ("test", n_test))):
            pool = random_images(task, 8 * n, seed=100 * i + j)
            splits[split] = diverse(pool, predict(encoder, head, transform, pool), n)
        WRITERS[task](root, splits)
        out[task] = {s: labels for s, (_, labels) in splits.items()}
    return out


# ----------------------------------------------------------------------------------- direct checks

@torch.no_grad()
def direct_accuracy(encoder: torch.nn.Module, params: dict[str, torch.Tensor], head: torch.nn.Module,
                    loader) -> float:
    """Accuracy (%) of ``encoder`` with ``params`` and ``head`` over ``loader``, without Lightning."""
    enc = copy.deepcopy(encoder)
    enc.load_state_dict({**enc.state_dict(), **params}, strict=True)
    enc.eval()
    right = total = 0
    for x, y in loader:
        right += int((head(enc(x)).argmax(-1) == y).sum())
        total += len(y)
    assert total > 0
    return 100.0 * right / total


# ---------------------------------------------------------------------------------------- attacks

def malicious_pickle(path: Path, marker: Path) -> Path:
    """A torch file whose pickle creates a ``src.modeling.ImageEncoder`` (an allowed name) and sets its
    ``cache_dir`` to ``os.system("touch MARKER")``: unpickling it with ``pickle`` runs the command."""
    payload = (b"\x80\x02" + _g("src.modeling", "ImageEncoder") + b")\x81" + b"}" + _s("cache_dir")
               + _g("os", "system") + _s(f"touch {marker}") + b"\x85R" + b"sb.")
    return _torch_file(path, payload)


def payload_runs_under_plain_pickle(path: Path) -> None:
    """Unpickle ``path``'s pickle with the standard unpickler (``src.modeling`` replaced by a plain class):
    what ``torch.load(weights_only=False)`` would do with the release's code importable."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))

    class Plain:
        pass

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            return Plain if module == "src.modeling" else super().find_class(module, name)

    import io

    Unpickler(io.BytesIO(data)).load()
