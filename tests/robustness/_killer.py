"""Run ``tvq ARGS`` and SIGKILL this process at a chosen point (a test hook, not a timer).

    python _killer.py HOOK N -- ARGS...

HOOK: ``add_bytes`` (the N-th tensor written to any output file), ``replace`` (just before the
N-th ``os.replace``), ``after_replace`` (just after it), ``swap`` / ``after_swap`` (around the
atomic exchange of an overwritten directory), ``none`` (no kill).
"""
import os
import signal
import sys

from tvq_lightning.cli.main import main
from tvq_lightning.store import io as io_mod
from tvq_lightning.store import st_stream

hook, n = sys.argv[1], int(sys.argv[2])
args = sys.argv[sys.argv.index("--") + 1:]
calls = {"n": 0}


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def counting(fn, before: bool):
    def wrapped(*a, **k):
        calls["n"] += 1
        if before and calls["n"] == n:
            die()
        out = fn(*a, **k)
        if not before and calls["n"] == n:
            die()
        return out
    return wrapped


if hook == "add_bytes":
    st_stream.SafetensorsStreamWriter.add_bytes = counting(st_stream.SafetensorsStreamWriter.add_bytes, True)
elif hook in ("replace", "after_replace"):
    os.replace = counting(os.replace, hook == "replace")
elif hook in ("swap", "after_swap"):
    io_mod._swap = counting(io_mod._swap, hook == "swap")
sys.exit(main(args))
