"""Bad inputs of the dense paths (NYUv2 files, FusionBench checkpoints, dense heads): each refused
with one TvqError line that names the file and the fix."""
import numpy as np
import pytest
import torch

from tvq_lightning.data.nyuv2 import NYUv2, write_standin
from tvq_lightning.errors import TvqError

pytest.importorskip("segmentation_models_pytorch")


def one_line(exc_info, *words):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for w in words:
        assert str(w) in msg, (w, msg)
    return msg


@pytest.fixture
def nyu(tmp_path):
    return write_standin(tmp_path / "nyu", train=3, val=2, size=(8, 12))


def _first(root, task="segmentation", split="test"):
    return NYUv2(str(root), tasks=[task]).split(task, split)[0]


def test_missing_root_split_folder_and_file(tmp_path, nyu):
    with pytest.raises(TvqError) as e:
        NYUv2(str(tmp_path / "nowhere"))
    one_line(e, "nowhere", "{train,val}/{image,label,depth,normal}", "Preparing NYUv2")
    import shutil

    shutil.rmtree(nyu / "val" / "normal")
    with pytest.raises(TvqError) as e:
        NYUv2(str(nyu), tasks=["normal"]).split("normal", "test")
    one_line(e, nyu / "val" / "normal", "does not exist")
    (nyu / "train" / "depth" / "1.npy").unlink()
    with pytest.raises(TvqError) as e:
        NYUv2(str(nyu), tasks=["depth"]).split("depth", "train")
    one_line(e, nyu / "train" / "depth" / "1.npy", "missing")
    with pytest.raises(TvqError) as e:
        NYUv2(str(nyu), tasks=["surface"])
    one_line(e, "surface", "segmentation")


@pytest.mark.parametrize("folder,array,words", [
    ("image", np.zeros((8, 12), np.float32), ["shape (8, 12)", "(H, W, 3)"]),
    ("label", np.zeros((8, 12, 2), np.float32), ["label map is (H, W)"]),
    ("label", np.full((8, 12), 40, np.float32), ["0..12"]),
    ("depth", np.zeros((4, 6, 1), np.float32), ["same H x W"]),
    ("normal", np.zeros((8, 12, 2), np.float32), ["(H, W, 3)"]),
    ("image", np.array(["a", "b"]), ["not numbers"]),
])
def test_wrong_shapes_and_dtypes(nyu, folder, array, words):
    np.save(nyu / "val" / folder / "0.npy", array)
    task = {"image": "segmentation", "label": "segmentation"}.get(folder, folder)
    with pytest.raises(TvqError) as e:
        _first(nyu, task)
    one_line(e, nyu / "val" / folder / "0.npy", *words)


def test_unreadable_npy(nyu):
    (nyu / "val" / "depth" / "0.npy").write_bytes(b"not an array")
    with pytest.raises(TvqError) as e:
        _first(nyu, "depth")
    one_line(e, nyu / "val" / "depth" / "0.npy", "re-extract")


def _fusionbench(extra=None, drop=None):
    from tvq_lightning.models.dense import DenseEncoder, DenseHead

    enc = DenseEncoder("resnet18", output_stride=8)
    head = DenseHead(enc.out_channels, 1, decoder="deeplabv3", decoder_channels=8)
    inv = {"decoder.aspp.": "0.", "decoder.conv.": "1.", "decoder.bn.": "2.", "head.": "4."}
    sd = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    for k, v in head.state_dict().items():
        src = next(p for p in inv if k.startswith(p))
        sd[f"decoders.depth.{inv[src]}{k[len(src):]}"] = v
    sd.update(extra or {})
    for k in drop or ():
        sd.pop(k)
    return {k: v.contiguous() for k, v in sd.items()}


@pytest.mark.parametrize("extra,drop,words", [
    ({}, ["encoder.layer2.0.conv1.weight"], ["lacks encoder key 'layer2.0.conv1.weight'"]),
    ({"encoder.extra.weight": torch.zeros(2)}, [], ["'extra.weight'", "unknown to"]),
    ({"classifier.weight": torch.zeros(2)}, [], ["'classifier.weight'", "decoders.<task>"]),
    ({"decoders.depth.7.weight": torch.zeros(2)}, [], ["'7.weight'", "DeepLab head"]),
    ({}, ["decoders.depth.4.weight"], ["lacks key '4.weight'"]),
    ({}, ["decoders.depth.2.running_var"], ["does not fit"]),
])
def test_fusionbench_missing_or_extra_keys(tmp_path, extra, drop, words):
    from safetensors.torch import save_file

    from tvq_lightning.store.fusionbench_nyuv2 import import_fusionbench_nyuv2

    good = _fusionbench()
    path = tmp_path / "depth.safetensors"
    save_file(_fusionbench(extra, drop), str(path))
    with pytest.raises(TvqError) as e:
        import_fusionbench_nyuv2(good, {"depth": path}, tmp_path / "store", tmp_path / "heads", encoder="resnet18")
    one_line(e, path, *words)
    assert not (tmp_path / "store").exists()        # refused before anything is written


def test_fusionbench_task_without_decoder(tmp_path):
    from tvq_lightning.store.fusionbench_nyuv2 import import_fusionbench_nyuv2

    sd = _fusionbench()
    with pytest.raises(TvqError) as e:
        import_fusionbench_nyuv2(sd, {"normal": sd}, tmp_path / "s", tmp_path / "h", encoder="resnet18")
    one_line(e, "decoders.normal", "depth")


def test_head_file_that_is_not_a_dense_head(tmp_path):
    from safetensors.torch import save_file

    from tvq_lightning.models.dense import DenseHead
    from tvq_lightning.models.heads import ClassificationHead

    cls = tmp_path / "cls.safetensors"
    ClassificationHead(torch.randn(3, 4)).save(cls)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 3)
    bad_cfg = tmp_path / "bad.safetensors"
    save_file({"head.weight": torch.zeros(1)}, str(bad_cfg), metadata={
        "format": "tvq_lightning.DenseHead", "config": '{"encoder_channels": [3, 8], "out_channels": 1, "decoder": "deeplabv3"}'})
    for path, words in ((cls, ["not a DenseHead file"]), (junk, ["not a DenseHead file"]),
                        (bad_cfg, ["do not fit"]), (tmp_path / "none.safetensors", ["does not exist"])):
        with pytest.raises(TvqError) as e:
            DenseHead.load(path)
        one_line(e, path, *words, "DenseHead.save")
