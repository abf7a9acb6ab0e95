"""Helpers of the robustness tests (a unique module name: ``conftest`` is taken by several directories)."""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import NamedTuple

from tvq_lightning.cli.main import main


def tree_hash(root: Path) -> str:
    """sha256 over every path under ``root`` (hidden ones included): kind, mode and bytes."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            h.update(f"{p.relative_to(root)}|{stat.S_IFMT(st.st_mode)}|{stat.S_IMODE(st.st_mode):o}\n".encode())
            if stat.S_ISREG(st.st_mode):
                h.update(p.read_bytes())
    return h.hexdigest()


class Result(NamedTuple):
    rc: int
    out: str
    err: str


def run_tvq(capture, args) -> Result:
    """``tvq ARGS`` through the entry point in this process; ``capture``: pytest's capsys or capfd."""
    capture.readouterr()
    try:
        status = main([str(a) for a in args])
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    streams = capture.readouterr()
    return Result(status, streams.out, streams.err)


def assert_refused(res: Result, *fragments: str) -> str:
    """Exit status 2 and exactly one line on stderr, ``tvq: error: ...``, holding ``fragments``."""
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert res.rc == 2, (res.rc, res.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("tvq: error: "), res.err[-2000:]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]
