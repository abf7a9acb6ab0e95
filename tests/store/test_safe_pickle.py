"""The restricted unpickler (tvq_lightning.store.safe_pickle) on checkpoints laid out as the task_vectors
and tall_masks releases: whole pickled modules of their ``src`` packages around a tiny open_clip CLIP,
written by a subprocess (so this process never imports ``src``) and read back here without that code."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tvq_lightning.errors import CheckpointError, OutputExistsError
from tvq_lightning.models.heads import ClassificationHead
from tvq_lightning.store import StoreConfig, TaskVectorStore, quantize_to_store
from tvq_lightning.store import safe_pickle, stand_ins
from tvq_lightning.store.checkpoints import load_state_dict, open_checkpoint
from tvq_lightning.store.import_heads import import_head, import_heads
from tvq_lightning.store.safe_pickle import (StandIn, UnsafePickleError, describe, is_module, module_state_dict,
                                             safe_load, safe_state_dict, stand_in_class)
from tvq_lightning.store.st_stream import save_safetensors

TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 2}}

# src/modeling.py as task_vectors lays it out: an encoder around open_clip, text tower deleted, and a head
MODELING = '''
import open_clip
import torch


class ImageEncoder(torch.nn.Module):
    def __init__(self, model_name, keep_lang=False):
        super().__init__()
        self.model, self.train_preprocess, self.val_preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=None)
        rgb = getattr(open_clip.transform, "_convert_to_rgb", None)  # open_clip 2.x had it in the transforms
        if rgb is not None:
            self.val_preprocess.transforms.insert(2, rgb)
        self.cache_dir = "/data/cache/open_clip"
        if not keep_lang and hasattr(self.model, "transformer"):
            delattr(self.model, "transformer")

    def forward(self, images):
        return self.model.encode_image(images)


class ClassificationHead(torch.nn.Linear):
    def __init__(self, normalize, weights, biases=None):
        super().__init__(weights.shape[1], weights.shape[0])
        self.normalize = normalize
        self.weight = torch.nn.Parameter(weights.clone())
        self.bias = torch.nn.Parameter(torch.zeros(weights.shape[0]) if biases is None else biases.clone())
'''
# tall_masks keeps its heads in src/models/heads.py
TALL_HEADS = MODELING[MODELING.index("class ClassificationHead"):]

MAKE = '''
import json, sys
from pathlib import Path
import open_clip, torch
from safetensors.torch import save_file

out = Path(sys.argv[1])
(out / "tvq-tiny-clip.json").write_text(sys.argv[2])
open_clip.add_model_config(out / "tvq-tiny-clip.json")
from src.modeling import ClassificationHead, ImageEncoder
from src.models.heads import ClassificationHead as TallHead


def save(obj, path, ref, **kw):
    torch.save(obj, out / path, **kw)
    sd = obj.state_dict()
    save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, out / f"{ref}.ref.safetensors")
    (out / f"{ref}.keys.json").write_text(json.dumps(list(sd)))


torch.manual_seed(0)
enc = ImageEncoder("tvq-tiny-clip")
save(enc, "zeroshot.pt", "zeroshot")
save(enc, "zeroshot_legacy.pt", "zeroshot", _use_new_zipfile_serialization=False)
with torch.no_grad():
    for p in enc.parameters():
        p.add_(0.01 * torch.randn_like(p))
(out / "SUN397").mkdir()
save(enc, "SUN397/finetuned.pt", "finetuned")
save(ClassificationHead(True, torch.randn(5, 32), torch.randn(5)), "head_SUN397.pt", "head")
save(TallHead(False, torch.randn(7, 32)), "tall_head.pt", "tall_head")
'''


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """The release's files (and ``<name>.ref.safetensors`` / ``<name>.keys.json`` references)."""
    pytest.importorskip("open_clip")
    root = tmp_path_factory.mktemp("release")
    code = root / "code"
    (code / "src" / "models").mkdir(parents=True)
    (code / "src" / "__init__.py").write_text("")
    (code / "src" / "models" / "__init__.py").write_text("")
    (code / "src" / "modeling.py").write_text(MODELING)
    (code / "src" / "models" / "heads.py").write_text("import torch\n\n\n" + TALL_HEADS)
    out = root / "files"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", MAKE, str(out), json.dumps(TINY_CLIP)], env=env, cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _ref(release: Path, name: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    return load_file(release / f"{name}.ref.safetensors"), json.loads((release / f"{name}.keys.json").read_text())


def _assert_no_src() -> None:
    assert not any(m == "src" or m.startswith("src.") for m in sys.modules), "the release's code was imported"


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["zeroshot.pt", "zeroshot_legacy.pt"])
def test_encoder_state_dict_without_its_code(release, name):
    ref, order = _ref(release, "zeroshot")
    with pytest.raises(CheckpointError, match="allow-pickle"):
        open_checkpoint(release / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation noise from TypedStorage or torch.load
        sd = load_state_dict(release / name, allow_pickle=True)
    assert list(sd) == order  # nn.Module.state_dict()'s order: non-persistent attn_mask skipped
    assert "model.attn_mask" not in sd and "model.visual.conv1.weight" in sd
    for k in order:
        assert sd[k].dtype == ref[k].dtype and torch.equal(sd[k], ref[k]), k
        assert not sd[k].requires_grad
    visual = open_checkpoint(release / name, prefix="model.visual.", allow_pickle=True)
    assert set(visual) == {k[len("model.visual."):] for k in order if k.startswith("model.visual.")}
    assert safe_state_dict(release / name).keys() == sd.keys()
    _assert_no_src()


@pytest.mark.zoo
def test_stand_ins_keep_the_pickled_attributes(release):
    enc = safe_load(release / "zeroshot.pt")
    assert stand_in_class(enc) == "src.modeling.ImageEncoder" and is_module(enc)
    assert stand_in_class(enc.model) == "open_clip.model.CLIP" and "transformer" not in enc.model._modules
    assert enc.cache_dir == "/data/cache/open_clip" and enc.training is True
    assert stand_in_class(enc.val_preprocess) == "torchvision.transforms.transforms.Compose"
    steps = enc.val_preprocess.transforms
    names = [stand_in_class(s) for s in steps]
    assert names[:2] == ["torchvision.transforms.transforms.Resize", "torchvision.transforms.transforms.CenterCrop"]
    assert names[-1] == "torchvision.transforms.transforms.Normalize"
    if "open_clip.transform._convert_to_rgb" in names:  # a function: its stand-in is a class, never called
        rgb = steps[names.index("open_clip.transform._convert_to_rgb")]
        assert isinstance(rgb, type) and issubclass(rgb, StandIn)
    mode = steps[0].interpolation
    assert stand_in_class(mode) == "torchvision.transforms.functional.InterpolationMode" and mode._tvq_args == ("bicubic",)
    assert list(steps[-1].mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    text = describe(enc)
    assert text.startswith("src.modeling.ImageEncoder (module, 38 tensors") and "model: open_clip.model.CLIP" in text
    assert describe({"a": 1}) == "dict (1 entries)" and stand_in_class(torch.ones(1)) is None
    with pytest.raises(AttributeError, match="stand-in for src.modeling.ImageEncoder has no attribute 'nope'"):
        enc.nope
    _assert_no_src()


@pytest.mark.zoo
def test_pickled_heads_import(release, tmp_path):
    ref, _ = _ref(release, "head")
    head = import_head(release / "head_SUN397.pt")
    assert stand_in_class(safe_load(release / "head_SUN397.pt")) == "src.modeling.ClassificationHead"
    assert head.normalize is True and torch.equal(head.weight, ref["weight"]) and torch.equal(head.bias, ref["bias"])
    tall_ref, _ = _ref(release, "tall_head")
    tall = import_head(release / "tall_head.pt")
    assert stand_in_class(safe_load(release / "tall_head.pt")) == "src.models.heads.ClassificationHead"
    assert tall.normalize is False and torch.equal(tall.weight, tall_ref["weight"]) and not tall.bias.any()
    with pytest.raises(CheckpointError, match="allow-pickle"):
        import_head(release / "head_SUN397.pt", allow_pickle=False)
    with pytest.raises(CheckpointError, match="not a classification head.*38 tensors"):
        import_head(release / "zeroshot.pt")
    save_safetensors({"weight": ref["weight"]}, tmp_path / "plain.safetensors")
    plain = import_head(tmp_path / "plain.safetensors")
    assert plain.normalize and not plain.bias.any()

    paths = {"SUN397": release / "head_SUN397.pt", "Cars": release / "tall_head.pt"}
    written = import_heads(paths, tmp_path / "heads")
    assert ClassificationHead.load(written["Cars"]).normalize is False     # recorded in the file's metadata
    assert written == {"SUN397": tmp_path / "heads" / "SUN397.safetensors", "Cars": tmp_path / "heads" / "Cars.safetensors"}
    loaded = ClassificationHead.load(written["SUN397"])
    assert torch.equal(loaded.weight, ref["weight"]) and torch.equal(loaded.bias, ref["bias"])
    with pytest.raises(OutputExistsError, match="SUN397.safetensors already exists"):
        import_heads({"SUN397": paths["SUN397"]}, tmp_path / "heads")
    import_heads({"SUN397": paths["SUN397"]}, tmp_path / "heads", overwrite=True)
    _assert_no_src()


@pytest.mark.zoo
def test_quantize_the_release(release, tmp_path):
    pre, _ = _ref(release, "zeroshot")
    ft, _ = _ref(release, "finetuned")
    out = tmp_path / "store"
    quantize_to_store(release / "zeroshot.pt", {"SUN397": release / "SUN397" / "finetuned.pt"}, out,
                      StoreConfig(scheme="fp32"), prefix="model.visual.", allow_pickle=True, progress=False)
    store = TaskVectorStore(out)
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    assert key in store.keys and "token_embedding.weight" not in store.keys
    expect = ft["model.visual." + key] - pre["model.visual." + key]
    assert torch.allclose(store.task_vector("SUN397", key), expect, atol=1e-7)

    # theta_0 wrapped differently (e.g. a converted nonlinear_zeroshot): one prefix each
    wrapped = tmp_path / "theta0.safetensors"
    save_safetensors({"image_encoder." + k: v for k, v in pre.items()}, wrapped)
    with pytest.raises(CheckpointError, match="no key starts with prefix 'model.visual.'"):
        quantize_to_store(wrapped, {"SUN397": release / "SUN397" / "finetuned.pt"}, tmp_path / "s2",
                          prefix="model.visual.", allow_pickle=True, progress=False)
    quantize_to_store(wrapped, {"SUN397": release / "SUN397" / "finetuned.pt"}, tmp_path / "s2", StoreConfig(scheme="fp32"),
                      pretrained_prefix="image_encoder.model.visual.", finetuned_prefix="model.visual.",
                      allow_pickle=True, progress=False)
    assert torch.allclose(TaskVectorStore(tmp_path / "s2").task_vector("SUN397", key), expect, atol=1e-7)
    _assert_no_src()


@pytest.mark.zoo
def test_trust_pickle_code_runs_the_files_code(release):
    """The louder opt-in unpickles with torch.load: it imports the file's classes (absent here)."""
    with pytest.raises(CheckpointError, match="module 'src' cannot be imported.*PYTHONPATH"):
        load_state_dict(release / "zeroshot.pt", trust_pickle_code=True)
    _assert_no_src()


# --------------------------------------------------------------------------- torch.nn modules and plain data


class _Local(torch.nn.Linear):
    """A class of this test file: outside the allow-list."""


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_nn_modules_give_their_state_dict(tmp_path, legacy):
    body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                               torch.nn.BatchNorm2d(4, track_running_stats=False),  # None buffers
                               torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4, 2, bias=False))
    body[1].num_batches_tracked += 3
    wrapped = torch.nn.ModuleDict({"net": body, "again": body})  # shared: keys under both names, as state_dict()
    path = tmp_path / "m.pt"
    torch.save({"model": wrapped, "epoch": 3}, path, _use_new_zipfile_serialization=not legacy)
    sd = load_state_dict(path, allow_pickle=True)
    ref = wrapped.state_dict()
    assert list(sd) == list(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert sd["net.1.num_batches_tracked"].item() == 3 and "net.5.bias" not in sd and "net.2.running_mean" not in sd
    # a module defined in this test file is outside the allow-list: its own class is refused by name
    torch.save(_Local(2, 2), path)
    with pytest.raises(UnsafePickleError, match="'test_safe_pickle._Local' is not an allowed class"):
        load_state_dict(path, allow_pickle=True)
    # the pickle module is usable by torch.load itself
    torch.save(body, path)
    obj = torch.load(path, weights_only=False, pickle_module=safe_pickle)
    assert stand_in_class(obj) == "torch.nn.modules.container.Sequential"
    assert list(module_state_dict(obj)) == list(body.state_dict())


def test_plain_data_is_rebuilt(tmp_path):
    sd = OrderedDict(w=torch.arange(6.0).reshape(2, 3).t())  # a non-contiguous view
    sd._metadata = {"": {"version": 1}}
    data = {"set": {1, 2}, "frozen": frozenset({"a"}), "complex": 1 + 2j, "slice": slice(1, 5, 2), "bytes": b"\x00\xff",
            "size": torch.Size([2, 3]), "device": torch.device("cpu"), "dtype": torch.bfloat16, "layout": torch.strided,
            "param": torch.nn.Parameter(torch.ones(2)), "sd": sd, "half": torch.ones(3, dtype=torch.float16)}
    path = tmp_path / "d.pt"
    torch.save(data, path)
    got = safe_load(path)
    for k in ("set", "frozen", "complex", "slice", "bytes", "size", "device", "dtype", "layout"):
        assert got[k] == data[k] and type(got[k]) is type(data[k]), k
    assert isinstance(got["param"], torch.nn.Parameter) and torch.equal(got["param"], data["param"])
    assert got["sd"]._metadata == sd._metadata and torch.equal(got["sd"]["w"], sd["w"]) and got["sd"]["w"].stride() == (1, 3)
    assert got["half"].dtype == torch.float16


# --------------------------------------------------------------------------- what is refused


def _g(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _s(text: str) -> bytes:
    data = text.encode()
    return b"X" + len(data).to_bytes(4, "little") + data


def _torch_file(path: Path, payload: bytes) -> Path:
    w = torch._C.PyTorchFileWriter(str(path))
    w.write_record("data.pkl", payload, len(payload))
    w.write_end_of_file()
    return path


P2 = b"\x80\x02"
_STAND_IN = _g("src.modeling", "ImageEncoder") + b")\x81"  # NEWOBJ of a stand-in
REFUSED = {
    "call_data_type": (P2 + _g("torch", "Tensor") + b"(J\x00\x00\x00\x40tR.", "calls 'torch.Tensor'"),
    "call_builtin_object": (P2 + _g("builtins", "dict") + b")R.", "calls 'builtins.dict'"),
    "newobj_data_type": (P2 + _g("torch", "Tensor") + b")\x81.", "creates a 'torch.Tensor' object"),
    "reconstructor": (P2 + _g("copyreg", "_reconstructor") + b"(" + _g("collections", "OrderedDict")
                      + _g("builtins", "object") + b"NtR.", "copyreg._reconstructor is applied to 'collections.OrderedDict'"),
    "build_on_size": (P2 + _g("torch", "Size") + b"(]tR}b.", "sets the state of a torch.Size object"),
    "append_to_set": (P2 + _g("builtins", "set") + b"(]tRK\x01a.", "appends items to a builtins.set object"),
    "setitem_on_tuple": (P2 + b"(tK\x01K\x02s.", "sets items of a builtins.tuple object"),
    "extension": (P2 + b"\x82\x01.", "extension code 1"),
    "rebuild_as_stand_in": (P2 + _g("torch._tensor", "_rebuild_from_type_v2") + b"(" + _g("torch._utils", "_rebuild_tensor_v2")
                            + _g("src.modeling", "ImageEncoder") + b")NtR.", "rebuilds a tensor as src.modeling.ImageEncoder"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_operations(tmp_path, case):
    payload, needle = REFUSED[case]
    with pytest.raises(UnsafePickleError, match="the file was not loaded") as ei:
        safe_pickle.loads(payload)
    assert needle in str(ei.value)
    path = _torch_file(tmp_path / "x.pt", payload)
    with pytest.raises(UnsafePickleError) as ei:
        safe_load(path)
    msg = str(ei.value)
    assert msg.startswith(f"{path}: ") and needle in msg and "\n" not in msg


def test_stand_in_state_and_items_are_recorded():
    obj = safe_pickle.loads(P2 + _STAND_IN + b"}" + _s("normalize") + b"\x88sb(K\x01K\x02u(K\x03e.")
    assert stand_in_class(obj) == "src.modeling.ImageEncoder" and obj.normalize is True
    assert obj._tvq_items == {1: 2} and obj._tvq_list == [3] and not is_module(obj)
    old = safe_pickle.loads(b"\x80\x01" + _g("copy_reg", "_reconstructor") + b"(" + _g("src.modeling", "ImageEncoder")
                            + _g("__builtin__", "object") + b"NtR.")
    assert stand_in_class(old) == "src.modeling.ImageEncoder"


def test_storage_and_views_are_bounded(tmp_path):
    storage = b"(" + _s("storage") + _g("torch", "FloatStorage") + _s("0") + _s("cpu") + b"J\x00\x00\x00\x10tQ"
    huge = P2 + _g("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + b"K\x00K\x01\x85K\x01\x85\x89NtR."
    with pytest.raises(CheckpointError, match="storage of 1073741824 bytes .*larger than the file"):
        safe_load(_torch_file(tmp_path / "huge.pt", huge))
    # many storages, each smaller than the file, that together are larger (torch's legacy reader allocates them)
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    legacy = b"".join(pickle.dumps(x, 2) for x in (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True}))
    pids = b"".join(b"(" + _s("storage") + _g("torch", "FloatStorage") + _s(str(k)) + _s("cpu") + b"K\x40NtQ"
                    for k in range(40))
    (tmp_path / "many.pt").write_bytes(legacy + P2 + b"(" + pids + b"l.")
    with pytest.raises(CheckpointError, match=r"storages of 2304 bytes in all\) is larger than the file"):
        safe_load(tmp_path / "many.pt")
    torch.save({"w": torch.ones(1).expand(1000)}, tmp_path / "expanded.pt")
    with pytest.raises(CheckpointError, match=r"size \(1000,\) views only 1 stored elements"):
        safe_load(tmp_path / "expanded.pt")
    with warnings.catch_warnings():  # torch.jit's deprecation, torch.load's note on TorchScript
        warnings.simplefilter("ignore")
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "scripted.pt"))
        with pytest.raises(UnsafePickleError, match="scripted.pt is a TorchScript archive"):
            safe_load(tmp_path / "scripted.pt")  # never handed to torch.jit.load
        with pytest.raises(CheckpointError, match="scripted.pt"):
            load_state_dict(tmp_path / "scripted.pt", allow_pickle=True)
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match="junk.pt"):
        safe_load(tmp_path / "junk.pt")


def test_module_walk_is_bounded(monkeypatch):
    kind = type("M", (StandIn,), {"_tvq_origin": "src.x.M"})

    def module(children: dict) -> StandIn:
        m = kind()
        m.__setstate__({"_parameters": {"w": torch.ones(1)}, "_buffers": {}, "_modules": children})
        return m

    loop = module({})
    loop._tvq_state["_modules"]["self"] = loop
    with pytest.raises(CheckpointError, match="nested too deep, in a cycle"):
        module_state_dict(loop)
    deep = module({})
    for _ in range(70):
        deep = module({"c": deep})
    with pytest.raises(CheckpointError, match="nested too deep"):
        module_state_dict(deep)
    shared = module({})
    for _ in range(40):  # 2**40 paths through 40 modules
        shared = module({"a": shared, "b": shared})
    monkeypatch.setattr(stand_ins, "_MAX_VISITS", 10_000)
    with pytest.raises(CheckpointError, match="shared too often"):
        module_state_dict(shared)
    assert list(module_state_dict(module({"a": module({}), "none": None}))) == ["w", "a.w"]
    with pytest.raises(CheckpointError, match="src.x.M is not a pickled module"):
        module_state_dict(kind())


def test_constructors_take_plain_data_only(tmp_path):
    """A stand-in's recorded attributes (e.g. a ``keys`` entry) never drive a real constructor."""
    keys = P2 + _STAND_IN + b"}" + _s("keys") + _g("torch.nn.parameter", "Parameter") + b"sb"
    for ctor in (_g("collections", "OrderedDict"), _g("builtins", "set"), _g("builtins", "complex"), _g("torch", "device")):
        with pytest.raises(ValueError, match="built from a ImageEncoder|numbers or strings"):
            safe_pickle.loads(P2 + ctor + b"(" + keys[2:] + b"tR.")
    fake = P2 + _g("torch._utils", "_rebuild_tensor_v2") + b"(" + b"(" + _s("storage") + _g("src.modeling", "ImageEncoder") \
        + _s("0") + _s("cpu") + b"K\x01tQK\x00K\x01\x85K\x01\x85\x89NtR."
    with pytest.raises(UnsafePickleError, match="loads a storage as src.modeling.ImageEncoder, which is not an allowed"):
        safe_load(_torch_file(tmp_path / "fake.pt", fake))
