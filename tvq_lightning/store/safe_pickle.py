"""Read pickled checkpoints (whole ``nn.Module`` objects) without running code from the file.

The task_vectors release (``zeroshot.pt``, ``<Dataset>/finetuned.pt``, ``head_<Dataset>.pt``) and
the tall_masks heads are ``torch.save(module)`` pickles of classes from those projects' ``src``
packages and from open_clip, torch.nn and torchvision. This module is a *pickle module* for
``torch.load(path, weights_only=False, pickle_module=safe_pickle)`` whose unpickler never imports
or calls anything the file names, except a fixed list of constructors of plain data and tensors:

* tensors, parameters, storages, dtypes, ``torch.Size``, ``torch.device``, ``OrderedDict``,
  ``set`` / ``frozenset`` / ``complex`` / ``slice`` and bytes are rebuilt for real (argument
  types and tensor views checked; backward hooks and Python attributes of tensors dropped);
* every class or function of the namespaces in :data:`STAND_IN_NAMESPACES` becomes an inert
  :class:`StandIn` subclass: "calling" it, ``__new__``, ``copyreg._reconstructor`` and
  ``__setstate__`` only record their arguments and state;
* any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...), a call of
  anything else, state set on a non-stand-in, the extension registry, or a storage larger than
  the file raise :class:`UnsafePickleError` naming the file and the global: nothing is loaded.

:func:`safe_load` gives the object graph, :func:`safe_state_dict` the tensors; reading stand-ins
(:func:`module_state_dict`, :func:`stand_in_class`, :func:`describe`) is :mod:`.stand_ins`'s, re-exported here.
"""
from __future__ import annotations

import _compat_pickle
import contextvars
import io
import math
import os
import pickle
import sys
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch

from tvq_lightning.errors import CheckpointError
from tvq_lightning.store.stand_ins import StandIn, describe, is_module, is_stand_in_type, module_state_dict, stand_in_class

__all__ = ["STAND_IN_NAMESPACES", "StandIn", "Unpickler", "UnpicklingError", "UnsafePickleError", "describe", "is_module",
           "load", "loads", "module_state_dict", "safe_load", "safe_state_dict", "stand_in_class"]

UnpicklingError = pickle.UnpicklingError
#: modules (``"pkg."``: the package and everything under it) whose globals become stand-ins
STAND_IN_NAMESPACES = ("src.", "open_clip.", "timm.", "torch.nn.modules.", "torch.nn.functional", "torch._C._nn",
                       "torchvision.transforms.", "tvq_lightning.models.", "lightning.", "pytorch_lightning.", "PIL.Image")
_STAND_IN_GLOBALS = frozenset({"argparse.Namespace", "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePosixPath",
                               "pathlib.PureWindowsPath"})
_ALLOWED = ("--allow-pickle admits tensors and the modules of task_vectors/tall_masks (src.*), open_clip, timm, torch.nn "
            "and torchvision transforms; --trust-pickle-code runs the file's code instead, only for a file you trust")
_FILE_BYTES: contextvars.ContextVar[int | None] = contextvars.ContextVar("tvq_safe_pickle_file_bytes", default=None)


class UnsafePickleError(CheckpointError):
    """A pickle names or calls something outside the allow-list; the file was not loaded."""


# --------------------------------------------------------------------------- what may be built for real


def _refuse(what: str, why: str = ", which is not an allowed class") -> UnsafePickleError:
    return UnsafePickleError(f"{what}{why}; the file was not loaded ({_ALLOWED})")


def _global_name(obj: Any) -> str:
    if is_stand_in_type(obj):
        return obj._tvq_origin
    if isinstance(obj, StandIn):
        return f"a {type(obj)._tvq_origin} object"
    if isinstance(obj, type) or callable(obj) and hasattr(obj, "__qualname__"):
        return f"{getattr(obj, '__module__', '?')}.{obj.__qualname__}"
    return f"a {type(obj).__module__}.{type(obj).__qualname__} object"


def _ints(x: Any, what: str) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in x):
        raise ValueError(f"tensor {what} {x!r} is not a tuple of integers")
    return tuple(x)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` (and v1) with checked arguments; hooks dropped."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise ValueError(f"a tensor is built from a {type(storage).__name__}, not a storage")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if not isinstance(offset, int) or offset < 0 or len(size) != len(stride) or min(size + stride, default=0) < 0:
        raise ValueError(f"invalid tensor view: offset {offset!r}, size {size}, stride {stride}")
    stored = storage._size()  # elements (the public .size() warns that TypedStorage is deprecated)
    if math.prod(size) > max(stored - offset, 0):  # an expanded view would materialise beyond the file
        raise ValueError(f"a tensor of size {size} views only {stored} stored elements; re-save it contiguous")
    meta = metadata if isinstance(metadata, dict) and all(isinstance(v, bool) for v in metadata.values()) else None
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, bool(requires_grad), OrderedDict(), meta)


def _new_parameter(data: Any = None, requires_grad: Any = True, *_ignored: Any) -> torch.nn.Parameter:
    """``Parameter(data, requires_grad)`` of a tensor; hooks and Python state dropped."""
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"a parameter is built from a {type(data).__name__}, not a tensor")
    return torch.nn.Parameter(data, bool(requires_grad))


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any = None) -> torch.Tensor:
    """``torch._tensor._rebuild_from_type_v2`` for plain tensors and parameters; Python state dropped."""
    if id(func) not in _TENSOR_BUILDERS or new_type not in (torch.Tensor, torch.nn.Parameter) or not isinstance(args, tuple):
        raise _refuse(f"the pickle rebuilds a tensor as {_global_name(new_type)} with {_global_name(func)}")
    t = _call(func, args)
    return _new_parameter(t, t.requires_grad) if new_type is torch.nn.Parameter else t


def _plain(items: Any, what: str) -> Any:
    """``items`` when it is a plain container (a stand-in's attributes must not drive a constructor)."""
    if type(items) not in (list, tuple, dict, OrderedDict, set, frozenset):
        raise ValueError(f"{what} is built from a {type(items).__name__}, not a list, tuple or dict")
    return items


def _scalars(*args: Any) -> tuple:
    if not all(type(a) in (int, float, str, bool) for a in args):
        raise ValueError("complex / torch.device take numbers or strings")
    return args


def _get_layout(name: Any) -> Any:
    if not isinstance(name, str):
        raise ValueError(f"layout name {name!r} is not a string")
    return torch.serialization._get_layout(name)


def _encode(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode``, as protocol-2 pickles write bytes: only str -> latin-1 bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ValueError("_codecs.encode is only allowed for latin-1 text")
    return text.encode("latin1")


def _reconstructor(cls: Any, base: Any, state: Any) -> StandIn:
    """``copyreg._reconstructor`` (protocols 0 and 1), for stand-in classes only."""
    if not is_stand_in_type(cls):
        raise _refuse(f"copyreg._reconstructor is applied to '{_global_name(cls)}'")
    obj = cls.__new__(cls)
    if state is not None:
        obj.__dict__["_tvq_base_state"] = state
    return obj


def _newobj(cls: Any, *args: Any, **kwargs: Any) -> Any:
    """``cls.__new__(cls, ...)`` (NEWOBJ, ``copyreg.__newobj__``) for stand-ins and plain data types."""
    if is_stand_in_type(cls):
        return cls.__new__(cls, *args, **kwargs)
    if cls in (OrderedDict, set, frozenset):
        return cls()
    if cls is torch.nn.Parameter:
        return _new_parameter(*args, **kwargs)
    raise _refuse(f"the pickle creates a '{_global_name(cls)}' object")


def _newobj_ex(cls: Any, args: Any, kwargs: Any) -> Any:
    return _newobj(cls, *args, **kwargs)


_REAL: dict[str, Any] = {  # name -> the object find_class gives (its calls go through _CALLS)
    "collections.OrderedDict": OrderedDict, "builtins.set": set, "builtins.frozenset": frozenset,
    "builtins.complex": complex, "builtins.slice": slice, "builtins.object": object, "builtins.dict": dict,
    "builtins.list": list, "builtins.tuple": tuple, "torch.Size": torch.Size, "torch.device": torch.device,
    "torch.Tensor": torch.Tensor, "torch._tensor.Tensor": torch.Tensor, "torch.nn.parameter.Parameter": torch.nn.Parameter,
    "torch.storage.UntypedStorage": torch.UntypedStorage, "torch.UntypedStorage": torch.UntypedStorage,
    "torch.storage.TypedStorage": torch.storage.TypedStorage, "torch.serialization._get_layout": torch.serialization._get_layout,
    "_codecs.encode": _encode, "copyreg._reconstructor": _reconstructor, "copyreg.__newobj__": _newobj,
    "copyreg.__newobj_ex__": _newobj_ex, "torch._tensor._rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2,
    "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
}
_REAL.update({str(v): v for v in vars(torch).values()  # torch.float32, torch.per_tensor_affine, ...
              if isinstance(v, (torch.dtype, torch.qscheme))})
_CALLS: dict[int, tuple[Any, Callable[..., Any]]] = {id(obj): (obj, impl) for obj, impl in [
    (OrderedDict, lambda items=(): OrderedDict(_plain(items, "an OrderedDict"))),
    (set, lambda items=(): set(_plain(items, "a set"))), (frozenset, lambda items=(): frozenset(_plain(items, "a frozenset"))),
    (complex, lambda *a: complex(*_scalars(*a))), (slice, slice), (torch.device, lambda *a: torch.device(*_scalars(*a))),
    (torch.Size, lambda dims=(): torch.Size(_ints(dims, "size"))),
    (torch.nn.Parameter, _new_parameter), (torch.serialization._get_layout, _get_layout), (_encode, _encode),
    (_reconstructor, _reconstructor), (_newobj, _newobj), (_newobj_ex, _newobj_ex),
    (torch._tensor._rebuild_from_type_v2, _rebuild_from_type), (torch._utils._rebuild_tensor, _rebuild_tensor),
    (torch._utils._rebuild_tensor_v2, _rebuild_tensor), (torch._utils._rebuild_parameter, _new_parameter),
    (torch._utils._rebuild_parameter_with_state, _new_parameter)]}
_TENSOR_BUILDERS = frozenset(id(f) for f in (torch._utils._rebuild_tensor, torch._utils._rebuild_tensor_v2,
                                             torch._utils._rebuild_parameter, torch._utils._rebuild_parameter_with_state))


def _call(func: Any, args: Any, kwargs: Mapping[str, Any] | None = None) -> Any:
    """The one place a pickle's call is made: stand-ins record it, allowed builders run checked."""
    if not isinstance(args, tuple) or kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError("call arguments are not a tuple")
    if is_stand_in_type(func):
        return func(*args, **(kwargs or {}))
    entry = _CALLS.get(id(func))
    if entry is None or entry[0] is not func:
        raise _refuse(f"the pickle calls '{_global_name(func)}'")
    return entry[1](*args, **(kwargs or {}))


# --------------------------------------------------------------------------- the unpickler


class Unpickler(pickle._Unpickler):  # the pure-Python unpickler: every opcode that runs code is ours
    """A restricted unpickler (see the module docstring); torch subclasses it for ``torch.load``."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._tvq_types: dict[str, type] = {}
        self._tvq_storages: set[Any] = set()  # keys of the storages loaded so far
        self._tvq_bytes = 0  # and their bytes

    def find_class(self, module: Any, name: Any) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise _refuse(f"pickled global {module!r}.{name!r}", " is not a name")
        shown = f"{module}.{name}"
        if self.proto < 3 and self.fix_imports:  # Python 2 names (__builtin__, copy_reg)
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            else:
                module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = f"{module}.{name}"
        if key in _REAL:
            return _REAL[key]
        if key in _STAND_IN_GLOBALS or any(module == ns.rstrip(".") or ns.endswith(".") and module.startswith(ns)
                                           for ns in STAND_IN_NAMESPACES):
            if key not in self._tvq_types:
                attrs = {"_tvq_origin": key, "__module__": __name__, "__qualname__": f"StandIn[{key}]"}
                self._tvq_types[key] = type(name, (StandIn,), attrs)
            return self._tvq_types[key]
        raise _refuse(f"pickled global '{shown}'", " is not an allowed class")

    def get_extension(self, code: int) -> None:  # copyreg's registry (and its process-wide cache)
        raise _refuse(f"the pickle uses copyreg extension code {code}", ", which is not allowed")

    def _persistent(self, pid: Any) -> Any:
        kind = pid[0] if isinstance(pid, tuple) and pid else None
        kind = kind.decode("ascii", "replace") if isinstance(kind, bytes) else kind
        if kind == "module" and len(pid) > 1:  # legacy torch.save: the class whose source it recorded
            return pid[1]
        if kind == "storage" and len(pid) >= 5:
            storage_type, key, numel = pid[1], pid[2], pid[4]
            if storage_type is torch.UntypedStorage:
                itemsize = 1
            elif isinstance(storage_type, torch.serialization.StorageType):
                itemsize = storage_type.dtype.itemsize
            else:
                raise _refuse(f"the pickle loads a storage as {_global_name(storage_type)}")
            if type(key) not in (str, bytes) or type(numel) is not int or numel < 0:
                raise ValueError("invalid storage record")
            if key not in self._tvq_storages:
                self._tvq_storages.add(key)
                self._tvq_bytes += numel * itemsize
            limit = _FILE_BYTES.get()
            if limit is not None and self._tvq_bytes > limit:
                raise ValueError(f"a storage of {numel * itemsize} bytes (storages of {self._tvq_bytes} bytes in all) "
                                 f"is larger than the file ({limit} bytes)")
        return self.persistent_load(pid)

    def _op_persid(self) -> None:
        self.append(self._persistent(self.readline()[:-1].decode("ascii")))

    def _op_binpersid(self) -> None:
        self.append(self._persistent(self.stack.pop()))

    def _op_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = _call(self.stack[-1], args)

    def _op_newobj(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = _call(_newobj, (self.stack[-1], *args) if isinstance(args, tuple) else args)

    def _op_newobj_ex(self) -> None:
        kwargs, args = self.stack.pop(), self.stack.pop()
        self.stack[-1] = _call(_newobj_ex, (self.stack[-1], args, kwargs))

    def _instantiate(self, klass: Any, args: list) -> None:  # INST / OBJ (protocols 0, 1)
        self.append(_call(klass, tuple(args)))

    def _op_build(self) -> None:
        state, inst = self.stack.pop(), self.stack[-1]
        if isinstance(inst, StandIn):
            StandIn.__setstate__(inst, state)
        elif type(inst) is OrderedDict and (state is None or isinstance(state, dict)):
            inst.__dict__.update((k, v) for k, v in (state or {}).items() if isinstance(k, str))  # e.g. _metadata
        else:
            raise _refuse(f"the pickle sets the state of {_global_name(inst)}")

    def _add(self, items: list) -> None:
        target = self.stack[-1]
        if type(target) is list:
            list.extend(target, items)
        elif isinstance(target, StandIn):
            target.__dict__["_tvq_list"].extend(items)
        else:
            raise _refuse(f"the pickle appends items to {_global_name(target)}")

    def _set(self, items: list) -> None:
        target = self.stack[-1]
        pairs = zip(items[::2], items[1::2])
        if type(target) in (dict, OrderedDict):
            type(target).update(target, pairs)
        elif isinstance(target, StandIn):
            target.__dict__["_tvq_items"].update(pairs)
        else:
            raise _refuse(f"the pickle sets items of {_global_name(target)}")

    def _op_append(self) -> None:
        self._add([self.stack.pop()])

    def _op_appends(self) -> None:
        self._add(self.pop_mark())

    def _op_setitem(self) -> None:
        value, key = self.stack.pop(), self.stack.pop()
        self._set([key, value])

    def _op_setitems(self) -> None:
        self._set(self.pop_mark())

    def _op_additems(self) -> None:
        items, target = self.pop_mark(), self.stack[-1]
        if type(target) is not set:
            raise _refuse(f"the pickle adds set items to {_global_name(target)}")
        set.update(target, items)

    for _op, _fn in [(pickle.PERSID, _op_persid), (pickle.BINPERSID, _op_binpersid), (pickle.REDUCE, _op_reduce),
                     (pickle.NEWOBJ, _op_newobj), (pickle.NEWOBJ_EX, _op_newobj_ex), (pickle.BUILD, _op_build),
                     (pickle.APPEND, _op_append), (pickle.APPENDS, _op_appends), (pickle.SETITEM, _op_setitem),
                     (pickle.SETITEMS, _op_setitems), (pickle.ADDITEMS, _op_additems)]:
        dispatch[_op[0]] = _fn
    del _op, _fn


def load(file: Any, **kwargs: Any) -> Any:
    """``pickle.load`` through :class:`Unpickler`."""
    return Unpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs: Any) -> Any:
    """``pickle.loads`` through :class:`Unpickler`."""
    return load(io.BytesIO(data), **kwargs)


# --------------------------------------------------------------------------- loading


def safe_load(path: str | os.PathLike) -> Any:
    """The object a ``torch.save`` file holds, classes outside the allow-list as :class:`StandIn` s.

    Raises :class:`UnsafePickleError` naming the file and the global it refuses, and
    :class:`CheckpointError` for a file that is not a readable torch checkpoint.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
        size = p.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read ({e.strerror or e}); check the path and its permissions") from e
    if is_zip and _is_torchscript(p):  # torch.load would hand it to torch.jit.load, which runs its code
        raise UnsafePickleError(f"{p} is a TorchScript archive, not a pickled checkpoint; the file was not loaded "
                                f"(if you trust it, load it with torch.jit.load and save its state_dict())")
    token = _FILE_BYTES.set(size)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(p, map_location="cpu", weights_only=False, pickle_module=sys.modules[__name__], mmap=is_zip)
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{p}: {e}") from None
    except Exception as e:  # truncated, garbled, a view out of bounds, ...
        detail = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:200]
        raise CheckpointError(f"{p} could not be unpickled safely ({detail}); re-export it") from e
    finally:
        _FILE_BYTES.reset(token)


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1] == "constants.pkl" for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False  # torch.load reports what is wrong with the file


def safe_state_dict(path: str | os.PathLike, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of any checkpoint, a pickled one read through :func:`safe_load` (``allow_pickle=True``)."""
    from .checkpoints import load_state_dict

    return load_state_dict(path, prefix=prefix, allow_pickle=True)
