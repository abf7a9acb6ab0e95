"""tvq_lightning.runtime: the glibc mmap threshold the CLI sets, and its environment override."""
import sys

import pytest

from tvq_lightning.runtime import configure_allocator


@pytest.mark.parametrize("value", ["off", "0", "OFF "])
def test_environment_turns_it_off(monkeypatch, value):
    monkeypatch.setenv("TVQ_MMAP_THRESHOLD", value)
    assert configure_allocator() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_applies_on_linux(monkeypatch):
    monkeypatch.setenv("TVQ_MMAP_THRESHOLD", str(32 << 20))   # glibc's own upper end of the dynamic threshold
    assert configure_allocator() is True
    assert configure_allocator(32 << 20) is True
    assert configure_allocator(0) is False


def test_the_demo_leaves_the_allocator_alone(monkeypatch):
    """`tvq demo` trains networks: no fixed threshold; the streaming commands get it."""
    import tvq_lightning.cli.main as cli

    calls = []
    monkeypatch.setattr(cli, "configure_allocator", lambda: calls.append(1))
    monkeypatch.setattr(cli, "_quiet_on_broken_pipe", lambda command, argv: 0)
    cli.main(["demo", "--quick"])
    assert calls == []
    cli.main(["inspect", "nowhere"])
    assert calls == [1]
