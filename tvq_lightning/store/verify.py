"""Checking a whole store (``tvq inspect --verify``) and adding checksums to a version-1 store.

:func:`verify_store` reads every file the layout names and reports, without raising, what is
wrong: a damaged or edited ``layout.json``, a missing or unreadable file, a header or tensor whose
CRC-32 differs from the recorded one, tensors that are not the layout's keys or have other
shapes, and (as notes) files the layout does not name and temporary files of killed runs.
:func:`upgrade_store` records the checksums of a version-1 store's files in a version-2 layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import CheckpointError, IntegrityError, StoreError, TvqError
from .checkpoints import open_checkpoint, read_safetensors_header
from .fingerprint import crc32
from .io import atomic_write_json, output_errors, stale_temps
from .layout import LAYOUT_FILE, Layout, read_layout

__all__ = ["VerifyReport", "file_checksums", "upgrade_store", "verify_store"]

_CHUNK = 8 << 20


@dataclass
class VerifyReport:
    """What :func:`verify_store` found. ``ok``: no problem (notes are not problems)."""

    path: str
    version: int | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: int = 0
    verified_tensors: int = 0
    unverified_files: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        """Several lines for a terminal: a verdict, then each problem and note."""
        state = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        head = (f"store {self.path}: {state}; layout version {self.version}, {self.files} file(s), "
                f"{self.verified_tensors} tensor(s) verified, {self.unverified_files} file(s) without checksums")
        return "\n".join([head, *(f"  problem: {p}" for p in self.problems), *(f"  note: {n}" for n in self.notes)])

    def raise_if_bad(self) -> None:
        """Raise one line naming the first problem (an :class:`IntegrityError`) when not ``ok``."""
        if self.problems:
            more = f" (and {len(self.problems) - 1} more problem(s))" if len(self.problems) > 1 else ""
            raise IntegrityError(f"{self.problems[0]}{more}")

    def to_json(self) -> dict:
        return {"path": self.path, "ok": self.ok, "version": self.version, "problems": self.problems,
                "notes": self.notes, "files": self.files, "verified_tensors": self.verified_tensors,
                "unverified_files": self.unverified_files}


def file_checksums(path: Path) -> tuple[int, ...]:
    """CRC-32 of a safetensors file's header (8-byte length + JSON), then of each tensor's bytes in
    file order: what layout version 2 records per file (:class:`CheckpointError` if unreadable)."""
    entries, _, start = read_safetensors_header(path)
    try:
        with open(path, "rb") as f:
            out = [crc32(f.read(start))]
            buf = bytearray(_CHUNK)
            view = memoryview(buf)
            for e in entries.values():
                begin, end = e["data_offsets"]
                f.seek(start + begin)
                crc, left = 0, end - begin
                while left:
                    n = f.readinto(view[: min(left, _CHUNK)])
                    if not n:
                        raise CheckpointError(f"{path} is truncated; restore it or re-create the store")
                    crc, left = crc32(view[:n], crc), left - n
                out.append(crc)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e}); check its permissions") from None
    return tuple(out)


def verify_store(path: str | Path, pretrained=None) -> VerifyReport:
    """Check every file of store ``path`` against its layout (and theta_0's keys when ``pretrained``
    is given: a path or a state dict). Never raises for a damaged store: see the report; call
    :meth:`VerifyReport.raise_if_bad` for a one-line error.

    Use from the CLI: ``report = verify_store(path)``; print ``report.format()`` (or
    ``json.dumps(report.to_json())``), then ``report.raise_if_bad()`` (exit 2 when it raises).
    """
    path = Path(path)
    report = VerifyReport(str(path))
    try:
        layout = read_layout(path)
    except StoreError as e:
        report.problems.append(str(e))
        return report
    report.version = layout.version
    if layout.version < 2:
        report.notes.append(f"layout version {layout.version} records no checksums: the data was not verified; "
                            f"add them with `tvq inspect {path} --upgrade` (it trusts the files as they are now)")
    for name, info in layout.files().items():
        report.files += 1
        _check_file(path, layout, name, info, report)
    _check_leftovers(path, layout, report)
    if pretrained is not None and report.ok:
        _check_pretrained(path, pretrained, report)
    return report


def _check_file(root: Path, layout: Layout, name: str, info, report: VerifyReport) -> None:
    what = "the shared base file" if name == "<base>" else f"task {name!r}'s file"
    file = root / info.file
    if not file.is_file():
        report.problems.append(f"store {root} is missing {info.file} ({what}); restore it or re-create the store")
        return
    try:
        sd = open_checkpoint(file)
        shapes = {k: sd.meta(k)[0] for k in sd}
        crcs = file_checksums(file) if info.crc32 is not None else None
    except CheckpointError as e:
        report.problems.append(f"store {root}: {what}: {e}")
        return
    except (TypeError, ValueError, KeyError, OverflowError) as e:  # a header the checkpoint reader does not expect
        report.problems.append(f"store {root}: {what}: {info.file} has a damaged header ({type(e).__name__}); restore "
                               f"it or re-create the store")
        return
    for tensor, shape in shapes.items():
        key, _, suffix = tensor.partition("#")
        k = layout.keys.get(key)
        if k is None:
            report.problems.append(f"store {root}: {info.file} holds tensor {tensor!r}, not a key of layout.json; "
                                   f"the layout or the file is damaged: re-create the store")
        elif not suffix and not k.quantized and tuple(shape) != tuple(k.shape):
            report.problems.append(f"store {root}: {info.file} stores {tensor!r} with shape {list(shape)}, layout.json "
                                   f"says {list(k.shape)}; re-create the store")
    if crcs is None:
        report.unverified_files += 1
        return
    if crcs[0] != info.crc32[0]:
        report.problems.append(f"store {root}: the header of {info.file} does not match its checksum; restore the file "
                               f"or re-create the store")
    if len(crcs) != len(info.crc32):
        report.problems.append(f"store {root}: {info.file} holds {len(crcs) - 1} tensors, layout.json recorded "
                               f"{len(info.crc32) - 1}; restore the file or re-create the store")
        return
    for tensor, got, want in zip(shapes, crcs[1:], info.crc32[1:]):
        if got != want:
            report.problems.append(f"store {root}: tensor {tensor!r} in {info.file} does not match its checksum; restore "
                                   f"the file or re-create the store")
        else:
            report.verified_tensors += 1
    if info.nbytes and file.stat().st_size != info.nbytes:
        report.problems.append(f"store {root}: {info.file} has {file.stat().st_size} bytes, layout.json recorded "
                               f"{info.nbytes}; restore the file or re-create the store")


def _check_leftovers(root: Path, layout: Layout, report: VerifyReport) -> None:
    named = {Path(t.file).as_posix() for t in layout.files().values()}
    for d in (root, root / "tasks"):
        for p in sorted(d.glob("*.safetensors")) if d.is_dir() else []:
            rel = p.relative_to(root).as_posix()
            if rel not in named:
                report.notes.append(f"{rel} is not part of the store (left by an interrupted run?); it is unused and "
                                    f"can be removed")
        for p in stale_temps(d):
            report.notes.append(f"{p.relative_to(root).as_posix()} is a temporary file of a killed run; the next "
                                f"`tvq quantize` into this store removes it")


def _check_pretrained(root: Path, pretrained, report: VerifyReport) -> None:
    from .reader import TaskVectorStore
    from .sources import open_source

    try:
        pre = open_source("pretrained", pretrained)
        store = TaskVectorStore(root)
        store.check_pretrained(pre.sd, label=pre.label)
        store.check_layout(pre)
    except TvqError as e:
        report.problems.append(str(e))


def upgrade_store(path: str | Path) -> Layout:
    """Record the checksums of a version-1 store's files: its layout is rewritten as version 2
    (atomically; the data files are not touched). It trusts the files as they are: check them (e.g.
    merge once, or compare with a backup) before. A store that already has them is left alone."""
    path = Path(path)
    layout = read_layout(path)
    if layout.version >= 2 and layout.verifiable:
        return layout

    def sealed(info):
        if info is None or info.crc32 is not None:
            return info
        try:
            return replace(info, crc32=file_checksums(path / info.file))
        except CheckpointError as e:
            raise StoreError(f"store {path} cannot be upgraded ({e}); re-create it with `tvq quantize`") from None

    new = layout.with_(tasks={n: sealed(t) for n, t in layout.tasks.items()}, base=sealed(layout.base), version=2)
    with output_errors(path / LAYOUT_FILE):
        atomic_write_json(path / LAYOUT_FILE, new.to_json())
    return new
