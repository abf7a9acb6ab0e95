"""Atomic file output: nothing is half-written, existing outputs are never half-overwritten.

- :func:`atomic_write_bytes` / :func:`atomic_write_json`: temp file in the same directory, then
  ``os.replace`` (fsync first when ``TVQ_FSYNC=1``).
- ``.safetensors`` files tensor by tensor: :mod:`.st_stream` (built on this module's temp files).
- :func:`staged_directory`: build a directory under a temporary name and move it into place only
  when complete.
- :func:`check_output`: what may be replaced (``overwrite`` only replaces what tvq wrote, as told
  by a ``replaceable`` test), and where a new output can go; :func:`output_errors` turns the
  operating system's errors (disk full, permission denied, read-only, ...) into one-line
  :class:`~tvq_lightning.errors.OutputError`.

Temporary names are ``.<name>.<pid>.<8 random>.<tmp|part|staging|old>`` next to the final path:
:func:`clean_stale` removes those of processes that no longer run (a killed run), never a live
writer's. New files and directories get the permissions the umask allows (``mkstemp`` /
``mkdtemp`` alone would make them private).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import OutputError, OutputExistsError


def _durable() -> bool:
    """fsync before every rename when ``TVQ_FSYNC=1``.

    Renaming a complete temp file is atomic for every crash of the process; fsync additionally
    survives power loss, at the cost of waiting for the disk (~0.1 s per 50 MB here), so it is
    opt-in.
    """
    return os.environ.get("TVQ_FSYNC", "") in ("1", "true", "yes")

Replaceable = Callable[[Path], bool]


def check_output(path: Path, overwrite: bool, replaceable: Replaceable | None = None, *, directory: bool = False,
                 what: str = "output") -> None:
    """Refuse an output ``path`` that cannot or must not be written, before any work.

    ``directory``: the output is a directory (a store, an artifact), else a file. An existing
    ``path`` is replaced only with ``overwrite`` and only when ``replaceable(path)`` says tvq wrote
    it (None: anything of the right kind, for callers that own their output's location). A file
    output needs an existing parent directory; a directory output's missing parents are created.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if path.is_dir() != directory:
            kind = "a directory" if path.is_dir() else "a file"
            need = "a directory path" if directory else "a file path (e.g. DIR/merged.safetensors)"
            raise OutputExistsError(f"{path} is {kind}; the {what} needs {need}: choose another --out")
        ours = replaceable is None or replaceable(path)
        if not ours:
            raise OutputExistsError(f"{path} already exists and is not a {what} written by tvq; it is left untouched: "
                                    f"choose another --out")
        if not overwrite:
            raise OutputExistsError(f"{path} already exists; choose another output path or pass --overwrite")
        here = Path.cwd().resolve()
        if directory and (path.resolve() == here or path.resolve() in here.parents):
            raise OutputExistsError(f"{path} is the current directory (or holds it) and cannot be replaced while in "
                                    f"use; run from elsewhere or name the {what} by another path")
    parent = path.parent
    while not parent.exists() and directory and parent != parent.parent:
        parent = parent.parent
    if not parent.exists():
        raise OutputError(f"{path.parent}: no such directory for --out; create it first")
    if not parent.is_dir():
        raise OutputError(f"{parent} is not a directory, so --out {path} cannot be created there; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: permission denied (not writable); choose a writable --out")


_FIXES = {
    errno.ENOSPC: "the disk is full: free space or choose another --out",
    errno.EDQUOT: "the disk quota is exhausted: free space or choose another --out",
    errno.EFBIG: "the file size limit (ulimit -f) or the file system's maximum was reached: raise it or choose another --out",
    errno.EACCES: "permission denied: choose a writable --out",
    errno.EPERM: "operation not permitted: choose a writable --out",
    errno.EROFS: "the file system is read-only: choose another --out",
    errno.ENOENT: "a directory on the path does not exist: check the path",
    errno.ENOTDIR: "a parent on the path is a file, not a directory: choose another --out",
    errno.EISDIR: "it is a directory: name a file",
    errno.EEXIST: "it exists: choose another --out",
}


def os_error(e: OSError, path: Path | str) -> OutputError:
    """The one-line :class:`OutputError` for an operating-system error while writing ``path``."""
    where = e.filename if e.filename is not None else path
    fix = _FIXES.get(e.errno, "check the path, its permissions and the free space")
    return OutputError(f"{where}: {e.strerror or type(e).__name__}; {fix}")


@contextlib.contextmanager
def output_errors(path: Path | str) -> Iterator[None]:
    """Turn an :class:`OSError` raised inside into :func:`os_error`'s one-line error."""
    try:
        yield
    except OSError as e:
        raise os_error(e, path) from None


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    with _UMASK_LOCK:  # reading the umask means setting it: keep the window private to this module
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


TEMP_SUFFIXES = ("tmp", "part", "staging", "old")
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]{8}\.(?:" + "|".join(TEMP_SUFFIXES) + r")$")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _tmp_sibling(path: Path, suffix: str = ".tmp") -> tuple[int, Path]:
    """A new empty temp file next to ``path``: its open descriptor and its path (mode: 0666 less the umask).

    Write through this descriptor rather than reopening with ``"wb"``: truncating a file makes
    ext4 flush it to disk when it is closed (``auto_da_alloc``), which costs ~25 ms per 50 MB.
    """
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=suffix, dir=path.parent)
    os.fchmod(fd, 0o666 & ~current_umask())
    return fd, Path(name)


def _tmp_dir(path: Path, suffix: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=suffix, dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (on this machine; a process of another user counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def stale_temps(directory: Path, name: str | None = None) -> list[Path]:
    """Temporary files / directories of tvq writers in ``directory`` whose process is gone
    (of output ``name`` only, if given); a live writer's are never listed."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    out = []
    for e in entries:
        m = _TEMP_NAME.match(e.name)
        if m and (name is None or m["name"] == name) and not pid_alive(int(m["pid"])):
            out.append(Path(e.path))
    return sorted(out)


def clean_stale(directory: Path, name: str | None = None) -> list[Path]:
    """Remove :func:`stale_temps` (left by killed runs); returns what was removed."""
    removed = []
    for p in stale_temps(directory, name):
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = _tmp_sibling(path)
    try:
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            if _durable():
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def staged_directory(final: Path, overwrite: bool = False, replaceable: Replaceable | None = None,
                     what: str = "output directory") -> Iterator[Path]:
    """Yield a fresh temp directory next to ``final``; on success it replaces ``final``.

    On error the temp directory is removed and ``final`` is untouched. With ``overwrite`` an
    existing ``final`` (that ``replaceable`` accepts, see :func:`check_output`) is moved aside
    first and deleted only after the new one is in place. Stale staging directories of killed
    runs for the same ``final`` are removed first.
    """
    final = Path(os.path.abspath(final))
    check_output(final, overwrite, replaceable, directory=True, what=what)
    with output_errors(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(final.parent, final.name)
        tmp = _tmp_dir(final, ".staging")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        with output_errors(final):
            if final.exists():
                if replaceable is not None and not replaceable(final):  # changed while we worked
                    raise OutputExistsError(f"{final} changed while the {what} was built and is not one tvq wrote; "
                                            f"it is left untouched: choose another --out")
                _swap(tmp, final)  # tmp now holds the old directory
            else:
                os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)


def _libc_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # pragma: no cover - not glibc >= 2.28
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint], ctypes.c_int
    return fn


_RENAMEAT2 = _libc_renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _swap(new: Path, final: Path) -> None:
    """Put directory ``new`` at ``final`` and the old ``final`` at ``new``: one atomic exchange
    (Linux ``renameat2``), so a kill at any moment leaves the old or the new output at ``final``.
    Elsewhere two renames, with the old directory aside (``.old``) for an instant."""
    if _RENAMEAT2 is not None and _RENAMEAT2(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(final), _RENAME_EXCHANGE) == 0:
        return
    old = _tmp_dir(final, ".old")
    os.rmdir(old)
    os.replace(final, old)
    os.replace(new, final)
    os.replace(old, new)
