"""End to end, through the ``tvq`` command line, the way a user arrives with published checkpoints:

- the task_vectors release (pickled open_clip ``ImageEncoder`` modules, pickled heads), read without its
  ``src`` code: ``tvq convert`` (θ0 and the heads), ``tvq quantize --allow-pickle``, ``tvq heads`` from
  the full model's text tower, ``tvq sweep`` on CLIPSuiteDataModule over every data layout it reads;
- FusionBench's Hugging Face folders (a full ``CLIPModel`` θ0, ``CLIPVisionModel`` fine-tunes):
  ``tvq heads --source hf_clip``, ``tvq quantize``, ``tvq sweep`` with the ``hf_clip`` encoder;
- a pickle that names an allowed class and carries an ``os.system`` payload, refused by the installed
  ``tvq`` console script without running it.

Each sweep's numbers are checked against a direct evaluation (no Lightning) of the same weights.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import _builders as B
from tvq_lightning.cli.main import main
from tvq_lightning.data.zoo import CLIPSuiteDataModule
from tvq_lightning.data.zoo.datamodule import resolve_transform
from tvq_lightning.merging.engine import merge_state_dict
from tvq_lightning.models.encoders import create_encoder
from tvq_lightning.models.heads import ClassificationHead
from tvq_lightning.store.checkpoints import load_state_dict
from tvq_lightning.store.layout import read_layout
from tvq_lightning.store.model_dir import open_model_dir
from tvq_lightning.store.reader import TaskVectorStore
from tvq_lightning.store.st_stream import save_safetensors

OC_TASKS = ("MNIST", "CIFAR10", "DTD", "RESISC45", "GTSRB")   # one task per data layout
HF_TASKS = ("CIFAR10", "EuroSAT")   # EuroSAT: class folders not in the catalog's order
CLASSES = {"MNIST": 10, "CIFAR10": 10, "DTD": 47, "EuroSAT": 10, "RESISC45": 45, "GTSRB": 43}
DATAMODULE = "tvq_lightning.data.zoo.CLIPSuiteDataModule"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A temporary root; offline, with the cache in it."""
    root = tmp_path_factory.mktemp("e2e")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TVQ_CACHE_DIR", str(root / "cache"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield root


def tvq(capsys, *args) -> tuple[int, str, str]:
    """``tvq ARGS`` in-process, through the console script's entry point."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def ok(capsys, *args) -> str:
    rc, out, err = tvq(capsys, *args)
    assert rc == 0, f"tvq {' '.join(map(str, args[:2]))}: rc {rc}: {err[-2000:]}"
    return out


def _assert_no_src() -> None:
    assert not any(m == "src" or m.startswith("src.") for m in sys.modules), "the release's code was imported"


def _sweep(capsys, cfg: dict, path: Path) -> dict:
    path.write_text(json.dumps(cfg, indent=1))       # JSON is YAML
    out = ok(capsys, "sweep", "-c", path, "--no-progress")
    assert "| task_arithmetic |" in out                # the table is printed
    report = json.loads((Path(cfg["out"]) / "results.json").read_text())
    res = report["results"]
    assert report["tasks"] == list(cfg["finetuned"])
    assert set(res) == {"individual", *cfg["methods"]}
    for row in res.values():
        assert set(row) == set(cfg["schemes"])
        for cell in row.values():
            assert set(cell["per_task"]) == set(cfg["finetuned"]) and 0.0 <= cell["avg"] <= 100.0
    table = (Path(cfg["out"]) / "table.md").read_text()
    for m in ("individual", *cfg["methods"]):
        assert f"| {m} |" in table
    assert table.count("| ties |") == 2               # the method table and the FP32 per-task table
    png = (Path(cfg["out"]) / "table.png").read_bytes()
    assert len(png) > 1000 and png[:8] == b"\x89PNG\r\n\x1a\n"
    return res


def _check_against_direct(res: dict, encoder, theta0: dict, stores: dict[str, Path], heads_dir: Path, dm) -> None:
    """The individual models (θ0 + τ̂_t on task t) of every store, evaluated here."""
    tasks = dm.tasks
    heads = {t: ClassificationHead.load(heads_dir / f"{t}.safetensors") for t in tasks}
    loaders = dict(zip(tasks, dm.test_dataloader()))
    for scheme, path in stores.items():
        st = TaskVectorStore(path)
        for t in tasks:
            own = {k: theta0[k] + st.task_vector(t, k, theta0[k]) for k in st.keys}
            want = B.direct_accuracy(encoder, own, heads[t], loaders[t])
            assert res["individual"][scheme]["per_task"][t] == pytest.approx(want, abs=1e-3), (scheme, t)
        st.close()
    # every image is labelled by its task's fine-tuned model: θ0 + τ_t (FP32) finds (nearly) all labels back,
    # which it cannot if a reader mislabels a layout or the sweep loads other weights or heads
    assert min(res["individual"]["fp32"]["per_task"].values()) >= 90.0, res["individual"]["fp32"]


def _direct_ta(res: dict, encoder, theta0_path: Path, fp32_store: Path, heads_dir: Path, dm) -> None:
    """Task arithmetic at the λ chosen on validation (the FP32 store), merged and evaluated here."""
    ta = res["task_arithmetic"]["fp32"]
    assert ta["value"] in (0.5, 1.0) and float(max(ta["val_sweep"], key=ta["val_sweep"].get)) == ta["value"]
    st = TaskVectorStore(fp32_store)
    merged = merge_state_dict(st, theta0_path, "task_arithmetic", scaling=ta["value"])
    st.close()
    for t, loader in zip(dm.tasks, dm.test_dataloader()):
        want = B.direct_accuracy(encoder, merged, ClassificationHead.load(heads_dir / f"{t}.safetensors"), loader)
        assert ta["per_task"][t] == pytest.approx(want, abs=1e-3), t


@pytest.mark.zoo
@pytest.mark.slow
def test_task_vectors_release_to_table(world, capsys):
    """zeroshot.pt, <Task>/finetuned.pt, head_<Task>.pt -> convert, quantize, heads, sweep -> the table."""
    pytest.importorskip("open_clip")
    pytest.importorskip("datasets")
    rel = B.write_task_vectors_release(world / "tv", {t: CLASSES[t] for t in OC_TASKS})
    config = rel / f"{B.OC_MODEL}.json"
    work = world / "tv" / "work"
    work.mkdir()
    _assert_no_src()

    # θ0 as safetensors, the encoder's own keys (the pickle's model.visual. stripped)
    theta0_path = work / "theta0.safetensors"
    rc, _, err = tvq(capsys, "convert", rel / "zeroshot.pt", theta0_path, "--prefix", "model.visual.")
    assert rc == 2 and err.count("\n") == 1 and "--allow-pickle" in err and not theta0_path.exists()
    out = ok(capsys, "convert", rel / "zeroshot.pt", theta0_path, "--prefix", "model.visual.", "--allow-pickle")
    assert f"to {theta0_path}" in out
    theta0 = load_state_dict(theta0_path)
    encoder = create_encoder("open_clip", model_name=B.OC_MODEL, config=str(config))
    assert set(theta0) == set(encoder.state_dict())

    # the release's heads, converted
    (work / "release_heads").mkdir()
    ref = load_file(rel / "heads.ref.safetensors")
    for t in OC_TASKS:
        ok(capsys, "convert", rel / f"head_{t}.pt", work / "release_heads" / f"{t}.safetensors", "--head", "--allow-pickle")
        head = ClassificationHead.load(work / "release_heads" / f"{t}.safetensors")
        assert head.normalize and head.num_classes == CLASSES[t] and head.in_features == 16
        assert torch.equal(head.weight, ref[f"{t}.weight"]) and torch.equal(head.bias, ref[f"{t}.bias"])

    # a TVQ-INT4 store from the pickled fine-tunes (θ0 already stripped: only theirs carry model.visual.)
    finetuned = {t: str(rel / t / "finetuned.pt") for t in OC_TASKS}
    tvq4 = work / "tvq4"
    ok(capsys, "quantize", "--pretrained", theta0_path, "--finetuned", *[f"{t}={p}" for t, p in finetuned.items()],
       "--out", tvq4, "--scheme", "tvq", "--bits", "4", "--finetuned-prefix", "model.visual.", "--allow-pickle", "--quiet")
    layout = read_layout(tvq4)
    assert list(layout.tasks) == list(OC_TASKS) and layout.config.scheme == "tvq" and layout.config.bits == 4

    # zero-shot heads from the text tower of the full model (the same image tower as zeroshot.pt)
    heads = work / "heads"
    out = ok(capsys, "heads", "--out", heads, "--tasks", *OC_TASKS, "--model", B.OC_MODEL, "--pretrained",
             rel / "openclip_full.safetensors", "--openclip-config", config, "--quiet")
    assert f"{len(OC_TASKS)} head(s)" in out
    for t in OC_TASKS:
        assert ClassificationHead.load(heads / f"{t}.safetensors").weight.shape == (CLASSES[t], 16)

    # the datasets, every image labelled by its task's fine-tuned model
    oracles = {}
    for t, path in finetuned.items():
        enc = copy.deepcopy(encoder)
        enc.load_state_dict(load_state_dict(path, prefix="model.visual.", allow_pickle=True))
        oracles[t] = (enc, ClassificationHead.load(heads / f"{t}.safetensors"))
    B.write_labelled_data(world / "tv" / "data", oracles, resolve_transform(None, model_name=B.OC_MODEL))
    data = {"root": str(world / "tv" / "data"), "model_name": B.OC_MODEL, "batch_size": 16,
            "split_dir": str(world / "tv" / "splits")}
    cfg = {"out": str(work / "sweep"), "backend": "model", "pretrained": str(theta0_path), "pretrained_prefix": "",
           "prefix": "model.visual.", "allow_pickle": True, "finetuned": finetuned, "stores": {"tvq4": str(tvq4)},
           "schemes": ["fp32", "tvq4"], "methods": ["task_arithmetic", "ties"], "all_methods_schemes": ["fp32", "tvq4"],
           "scaling_grid": [0.5, 1.0], "encoder": {"kind": "open_clip", "model_name": B.OC_MODEL, "config": str(config)},
           "heads_dir": str(heads), "data": {"class_path": DATAMODULE, "init_args": data},
           "trainer": {"accelerator": "cpu", "devices": 1}}
    res = _sweep(capsys, cfg, work / "sweep.yaml")
    fp32 = work / "sweep" / "stores" / "fp32"
    assert read_layout(fp32).config.scheme == "fp32" and not (work / "sweep" / "stores" / "tvq4").exists()

    dm = CLIPSuiteDataModule(list(OC_TASKS), **data)
    assert {t: dm.raw(t).kind for t in OC_TASKS} == {t: B.LAYOUTS[t] for t in OC_TASKS}
    _check_against_direct(res, encoder, theta0, {"fp32": fp32, "tvq4": tvq4}, heads, dm)
    _direct_ta(res, encoder, theta0_path, fp32, heads, dm)
    assert res["task_arithmetic"]["fp32"]["avg"] < res["individual"]["fp32"]["avg"] - 20  # one model for 5 tasks
    _assert_no_src()


@pytest.mark.slow
def test_fusionbench_folders_to_table(world, capsys):
    """θ0 as a CLIPModel folder, fine-tunes as CLIPVisionModel folders -> heads, quantize, sweep -> the table."""
    pytest.importorskip("transformers")
    root = world / "fb"
    root.mkdir()
    folders = B.write_fusionbench_release(root, list(HF_TASKS))
    pre = folders["pretrained"]

    heads = root / "heads"
    ok(capsys, "heads", "--source", "hf_clip", "--pretrained", pre, "--out", heads, "--tasks", *HF_TASKS, "--quiet")
    for t in HF_TASKS:
        assert ClassificationHead.load(heads / f"{t}.safetensors").weight.shape == (CLASSES[t], 16)

    tvq4 = root / "tvq4"
    ok(capsys, "quantize", "--pretrained", pre, "--finetuned", *[f"{t}={folders[t]}" for t in HF_TASKS],
       "--out", tvq4, "--scheme", "tvq", "--bits", "4", "--quiet")
    encoder = create_encoder("hf_clip", model_name_or_path=str(pre))
    assert encoder.output_dim == 16                       # θ0's visual projection: the heads' width
    st = TaskVectorStore(tvq4)
    assert set(st.keys) == set(encoder.state_dict()) and list(st.tasks) == list(HF_TASKS)
    st.close()

    # the datasets (two layouts), every image labelled by its task's fine-tuned model
    oracles = {}
    for t in HF_TASKS:
        enc = copy.deepcopy(encoder)
        with open_model_dir(folders[t]) as sd:
            enc.load_state_dict(dict(sd))
        oracles[t] = (enc, ClassificationHead.load(heads / f"{t}.safetensors"))
    B.write_labelled_data(root / "data", oracles, resolve_transform("clip_224"))
    data = {"root": str(root / "data"), "transform": "clip_224", "batch_size": 16, "split_dir": str(root / "splits")}
    cfg = {"out": str(root / "sweep"), "backend": "model", "pretrained": str(pre),
           "finetuned": {t: str(folders[t]) for t in HF_TASKS}, "stores": {"tvq4": str(tvq4)},
           "schemes": ["fp32", "tvq4"], "methods": ["task_arithmetic", "ties"], "all_methods_schemes": ["fp32", "tvq4"],
           "scaling_grid": [0.5, 1.0], "encoder": {"kind": "hf_clip", "model_name_or_path": str(pre)},
           "heads_dir": str(heads), "data": {"class_path": DATAMODULE, "init_args": data},
           "trainer": {"accelerator": "cpu", "devices": 1}}
    res = _sweep(capsys, cfg, root / "sweep.yaml")

    theta0_path = root / "sweep" / "pretrained.safetensors"   # the folder's vision keys, converted once by the sweep
    theta0 = load_state_dict(theta0_path)
    assert set(theta0) == set(encoder.state_dict())
    dm = CLIPSuiteDataModule(list(HF_TASKS), **data)
    assert {t: dm.raw(t).kind for t in HF_TASKS} == {t: B.LAYOUTS[t] for t in HF_TASKS}
    _check_against_direct(res, encoder, theta0, {"fp32": root / "sweep" / "stores" / "fp32", "tvq4": tvq4}, heads, dm)
    _direct_ta(res, encoder, theta0_path, root / "sweep" / "stores" / "fp32", heads, dm)


def test_malicious_pickle_is_refused_by_the_console_script(world):
    """An allowed class name does not smuggle a call: the installed ``tvq`` exits 2 with one line and the
    payload (which plain unpickling runs) never runs."""
    tmp = world / "attack"
    tmp.mkdir()
    probe = tmp / "probe"
    B.payload_runs_under_plain_pickle(B.malicious_pickle(tmp / "probe.pt", probe))
    assert probe.exists()                                   # the payload is live

    marker = tmp / "pwned"
    evil = B.malicious_pickle(tmp / "finetuned.pt", marker)
    pre = save_safetensors({"w": torch.zeros(2)}, tmp / "theta0.safetensors")
    exe = Path(sys.executable).with_name("tvq")
    assert exe.is_file(), f"the console script {exe} is not installed (pip install -e .)"
    res = subprocess.run([str(exe), "quantize", "--pretrained", str(pre), "--finetuned", f"SUN397={evil}",
                          "--out", str(tmp / "store"), "--allow-pickle", "--quiet"],
                         capture_output=True, text=True, timeout=120, cwd=tmp)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tvq: error: ") and str(evil) in lines[0], res.stderr
    assert "os.system" in lines[0] and "not loaded" in lines[0]
    assert not marker.exists() and not (tmp / "store").exists()
