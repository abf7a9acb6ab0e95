"""Hostile pickles given to ``--allow-pickle``: each is refused with exit status 2 and one line naming the
file and the global, no code from it runs (a ``touch MARKER`` payload leaves no marker), nothing is written."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tvq_lightning.store.st_stream import save_safetensors

from _robust_helpers import assert_refused, tree_hash


def _g(module: str, name: str) -> bytes:
    """GLOBAL opcode."""
    return b"c" + f"{module}\n{name}\n".encode()


def _s(text: str) -> bytes:
    """BINUNICODE opcode."""
    data = text.encode()
    return b"X" + len(data).to_bytes(4, "little") + data


def _call(func: bytes, *args: bytes) -> bytes:
    """func(*args): MARK args TUPLE REDUCE."""
    return func + b"(" + b"".join(args) + b"tR"


def _zip(path: Path, payload: bytes) -> None:
    """A torch.save zip file whose data.pkl is ``payload``."""
    w = torch._C.PyTorchFileWriter(str(path))
    w.write_record("data.pkl", payload, len(payload))
    w.write_end_of_file()


class _Reduces:
    """Pickles as ``os.system(cmd)``, as a hostile torch.save would write it."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


P2 = b"\x80\x02"


def _write(case: str, path: Path, marker: Path) -> str:
    """Write case ``case`` to ``path``; returns the global its refusal names."""
    touch = f"touch {marker}"
    if case == "allowed_class_wrapping_os_system":  # an ImageEncoder whose state holds os.system(...)
        _zip(path, P2 + _g("src.modeling", "ImageEncoder") + b")\x81}" + _s("cache_dir")
             + _call(_g("os", "system"), _s(touch)) + b"sb.")
        return "'os.system'"
    if case == "posix_system_by_torch_save":
        torch.save({"weight": torch.ones(2), "hook": _Reduces(touch)}, path)
        return f"'{os.system.__module__}.system'"
    if case == "builtins_eval":
        _zip(path, P2 + _call(_g("builtins", "eval"), _s(f"__import__('os').system({touch!r})")) + b".")
        return "'builtins.eval'"
    if case == "subprocess_popen":
        _zip(path, P2 + _call(_g("subprocess", "Popen"), b"(" + _s("touch") + _s(str(marker)) + b"l") + b".")
        return "'subprocess.Popen'"
    if case == "builtins_getattr":
        _zip(path, P2 + _call(_g("builtins", "getattr"), _g("src.modeling", "ImageEncoder"), _s("__init__")) + b".")
        return "'builtins.getattr'"
    if case == "python2_exec":  # Python 2 module names are mapped, the message names the global as written
        _zip(path, P2 + _call(_g("__builtin__", "exec"), _s(f"open({str(marker)!r}, 'w')")) + b".")
        return "'__builtin__.exec'"
    if case == "reconstructor_of_real_class":
        _zip(path, P2 + _call(_g("copyreg", "_reconstructor"), _g("collections", "OrderedDict"), _g("builtins", "object"),
                              b"N") + b".")
        return "copyreg._reconstructor is applied to 'collections.OrderedDict'"
    if case == "reconstructor_of_storage":
        _zip(path, P2 + _call(_g("copyreg", "_reconstructor"), _g("torch.storage", "UntypedStorage"),
                              _g("builtins", "object"), b"N") + b".")
        return "copyreg._reconstructor is applied to 'torch.storage.UntypedStorage'"
    if case == "plain_pickle_file":  # not a zip: torch's legacy reader, which unpickles with our module too
        path.write_bytes(P2 + _call(_g("os", "system"), _s(touch)) + b".")
        return "'os.system'"
    raise AssertionError(case)


CASES = ["allowed_class_wrapping_os_system", "posix_system_by_torch_save", "builtins_eval", "subprocess_popen",
         "builtins_getattr", "python2_exec", "reconstructor_of_real_class", "reconstructor_of_storage", "plain_pickle_file"]


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "r"
    root.mkdir()
    save_safetensors({"weight": torch.zeros(2)}, root / "pre.safetensors")
    return root


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", ["quantize", "convert"])
def test_hostile_pickle_is_refused(tvq, root, tmp_path, case, command):
    marker = tmp_path / "MARKER"
    evil = root / "finetuned.pt"
    needle = _write(case, evil, marker)
    before = tree_hash(root)
    if command == "quantize":
        argv = ["quantize", "--pretrained", root / "pre.safetensors", "--finetuned", f"t0={evil}", "--out", root / "store",
                "--quiet"]
    else:
        argv = ["convert", evil, root / "out.safetensors"]
    assert_refused(tvq(*argv), str(evil), "--allow-pickle")  # without the opt-in: asks for it
    line = assert_refused(tvq(*argv, "--allow-pickle"), str(evil), needle, "not an allowed class",
                          "the file was not loaded")
    assert "--trust-pickle-code" in line
    assert not marker.exists(), "code from the pickle ran"
    assert tree_hash(root) == before


def test_truncated_pickled_module_is_refused(tvq, root):
    path = root / "lin.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    before = tree_hash(root)
    assert_refused(tvq("convert", path, root / "out.safetensors", "--allow-pickle"), str(path))
    assert tree_hash(root) == before
