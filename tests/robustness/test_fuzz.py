"""Fuzzing the parsers a store is read with: layout.json, safetensors headers and the packed codes.

Only designed errors may come out (:class:`~tvq_lightning.errors.TvqError` subclasses), never a
crash, and nothing a crafted layout says may allocate beyond theta_0's shapes (a merge checks the
layout against theta_0 first): the whole module runs under an address-space cap of the process's
size at its start plus ``TVQ_FUZZ_HEADROOM_MB`` (default 1024), so an allocation a crafted file
asks for ends in a ``MemoryError`` the test reports. ``make test`` runs a few examples per target (seconds); for a long
run set ``TVQ_FUZZ_EXAMPLES`` (e.g. ``TVQ_FUZZ_EXAMPLES=5000 pytest tests/robustness/test_fuzz.py``).
"""
from __future__ import annotations

import copy
import json
import os
import resource
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvq_lightning.errors import TvqError
from tvq_lightning.merging import merge_state_dict
from tvq_lightning.store import TaskVectorStore, load_state_dict
from tvq_lightning.store.checkpoints import open_checkpoint
from tvq_lightning.store.layout import LAYOUT_CRC, Layout, layout_checksum, read_layout

EXAMPLES = int(os.environ.get("TVQ_FUZZ_EXAMPLES", "15"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="TVQ_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=list(HealthCheck))

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)


HEADROOM = int(os.environ.get("TVQ_FUZZ_HEADROOM_MB", "1024")) << 20


def _vm_size() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


@pytest.fixture(scope="module", autouse=True)
def address_space_cap(_world_src):
    """Cap this process's address space (soft RLIMIT_AS) for the module; restored afterwards
    (an unprivileged process may raise its soft limit back up to the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_size() + HEADROOM
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield cap
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_the_cap_holds(address_space_cap):
    """The cap is real: an allocation beyond the headroom fails instead of succeeding."""
    with pytest.raises((MemoryError, RuntimeError), match="(?i)memory|alloc"):
        torch.empty(HEADROOM * 2, dtype=torch.uint8).fill_(1)


@pytest.fixture(scope="module")
def base(_world_src):
    return _world_src


def _paths(layout: dict) -> list[tuple]:
    """Every (path of keys) to a value inside ``layout``, for mutations."""
    out = []

    def walk(node, path):
        out.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + (i,))

    walk(layout, ())
    return out[1:]


def _exercise(store_dir, pre) -> None:
    """Read everything a crafted store offers, as a merge and as plain reads: only TvqError."""
    try:
        merge_state_dict(store_dir, pre, "task_arithmetic")
    except TvqError:
        pass
    try:
        store = TaskVectorStore(store_dir)
    except TvqError:
        return
    for task in store.tasks[:2]:
        for key in [k for k, i in store.layout.keys.items() if i.numel <= pre.get(k, torch.empty(0)).numel()][:4]:
            try:
                store.task_vector(task, key, pre.get(key))
            except TvqError:
                pass


@FUZZ
@given(data=st.data())
def test_fuzz_layout_json(base, tmp_path_factory, data):
    """Crafted layouts (values replaced by arbitrary JSON, checksum recomputed), and raw bytes."""
    store = tmp_path_factory.mktemp("fz") / "s"
    shutil.copytree(base / "tvq", store)
    pre = load_state_dict(base / "ckpt" / "pre.safetensors")
    layout = json.loads((store / "layout.json").read_text())
    mutated = copy.deepcopy(layout)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(mutated)))
        parent = mutated
        for p in path[:-1]:
            parent = parent[p]
        parent[path[-1]] = data.draw(JSON)
    if data.draw(st.booleans()):
        mutated[LAYOUT_CRC] = layout_checksum(mutated)
    raw = json.dumps(mutated).encode()
    if data.draw(st.booleans()):
        raw = data.draw(st.binary(max_size=64)) if data.draw(st.booleans()) else raw[: data.draw(st.integers(0, len(raw)))]
    (store / "layout.json").write_bytes(raw)
    try:
        read_layout(store)
    except TvqError:
        return
    _exercise(store, pre)


@FUZZ
@given(obj=JSON)
def test_fuzz_layout_from_json(tmp_path_factory, obj):
    try:
        Layout.from_json(obj, tmp_path_factory.getbasetemp() / "layout.json")
    except TvqError:
        pass


def _header_file(path, header, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


ENTRY = st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "U8", "I32", "BF16", "F8_E4M3", "X9", ""]) | st.text(max_size=4),
                               "shape": st.lists(st.integers(-3, 1 << 40), max_size=4) | JSON,
                               "data_offsets": st.lists(st.integers(-5, 1 << 40), min_size=0, max_size=3) | JSON})


@FUZZ
@given(header=st.dictionaries(st.text(max_size=6), ENTRY | JSON, max_size=4), data=st.binary(max_size=256),
       suffix=st.sampled_from([".safetensors", ".bin"]))
def test_fuzz_safetensors_header(tmp_path_factory, header, data, suffix):
    path = tmp_path_factory.mktemp("st") / f"f{suffix}"
    _header_file(path, header, data)
    try:
        sd = open_checkpoint(path)
        for k in sd:
            sd[k].sum()
    except TvqError:
        pass


@FUZZ
@given(header=st.dictionaries(st.text(max_size=6), ENTRY | JSON, max_size=4), data=st.binary(max_size=256))
def test_fuzz_task_file_header_through_the_reader(base, tmp_path_factory, header, data):
    """Any header in a task file of a trusted store: the store reader gives a StoreError at most."""
    store = tmp_path_factory.mktemp("hd") / "s"
    shutil.copytree(base / "tvq", store)
    _header_file(store / json.loads((store / "layout.json").read_text())["tasks"]["t0"]["file"], header, data)
    try:
        TaskVectorStore(store, verify=False).task_vector("t0", "proj")
    except TvqError:
        pass


def test_safetensors_header_with_a_list_dtype(tmp_path):
    _header_file(tmp_path / "f.safetensors", {"w": {"dtype": [], "shape": [], "data_offsets": [0, 0]}}, b"")
    with pytest.raises(TvqError, match="f.safetensors"):   # found by the fuzzer: was a TypeError
        open_checkpoint(tmp_path / "f.safetensors")


@FUZZ
@given(data=st.data())
def test_fuzz_packed_codes(base, tmp_path_factory, data):
    """A task file whose packed codes, zero-points and scales have arbitrary lengths and dtypes
    (a trusted store, ``verify=False``, so the decoder itself meets them)."""
    store = tmp_path_factory.mktemp("pk") / "s"
    shutil.copytree(base / "tvq", store)
    rel = json.loads((store / "layout.json").read_text())["tasks"]["t1"]["file"]
    path = store / rel
    sd = dict(load_state_dict(path))
    key = data.draw(st.sampled_from(sorted({k.split("#")[0] for k in sd if "#" in k})))
    for suffix in data.draw(st.lists(st.sampled_from(["#q", "#z", "#s"]), min_size=1, max_size=3, unique=True)):
        if data.draw(st.integers(0, 5)) == 0:
            sd.pop(key + suffix, None)
            continue
        dtype = data.draw(st.sampled_from([torch.uint8, torch.int32, torch.float32, torch.float16, torch.int64]))
        n = data.draw(st.integers(0, 600))
        sd[key + suffix] = torch.randint(0, 255, (n,), dtype=torch.int64).to(dtype)
    path.unlink()
    from tvq_lightning.store.st_stream import save_safetensors

    def save(d, p):  # save_safetensors writes float32; keep the drawn dtypes
        from tvq_lightning.store.st_stream import SafetensorsStreamWriter, header_upper_bound

        with SafetensorsStreamWriter(p, header_upper_bound({k: ("F64", v.dim()) for k, v in d.items()}, 1 << 20)) as w:
            for k, v in d.items():
                w.add(k, v.contiguous())
            w.close()

    save(sd, path) if data.draw(st.booleans()) else save_safetensors(sd, path)
    pre = load_state_dict(base / "ckpt" / "pre.safetensors")
    s = TaskVectorStore(store, verify=False)
    try:
        tau = s.task_vector("t1", key, pre[key])
        assert tau.shape == pre[key].shape
    except TvqError:
        pass
