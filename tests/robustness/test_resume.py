"""A ``tvq fit`` interrupted and resumed from its checkpoint ends where an uninterrupted run of the
same total steps ends: the same coefficients (and Tinting's tinted heads), bit for bit.

Each case runs a shipped recipe through the ``tvq`` console script on the tiny inputs (3 training
batches per epoch), with a ModelCheckpoint every step added through ``--trainer.callbacks``:
"sigkill": N steps uninterrupted, alongside N steps killed by a real SIGKILL at step k (the run
is held there by :class:`_resume_helpers.PauseAt` until the test kills it) and then resumed to N
with ``--ckpt_path last``; "checkpoint": N steps, then the same run resumed from its step-k
checkpoint files (several k) to N again (a checkpoint does not depend on what the process did after writing
it). The steps k are in an epoch after an epoch boundary and at an epoch's end.

What makes this exact: the training loaders are resumable
(:class:`tvq_lightning.data.multitask.ResumableLoader`: the shuffling generator and the position in
the pass; Lightning restarts a plain DataLoader at the epoch's first batch with a fresh generator),
Tinting keeps its task-order generator in the checkpoint, Lightning restores Adam's state and the
raw (unclamped) coefficients, and the expert targets are recomputed, deterministically, when the
resumed fit starts. Both processes run with the same thread count, so float sums match bit for bit.
"""
from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

import _resume_helpers as H
from tvq_lightning.data import ToyTasks
from tvq_lightning.data.multitask import ResumableLoader

DATA = ["--data.init_args.test_size", "24", "--data.init_args.batch_size", "8", "--test_after_fit", "false"]
# (name, config, total steps N, interruption steps k, how); Tinting takes 2 optimizer steps per batch.
# AdaMerging resumes twice from one uninterrupted run: at the end of epoch 0 (k = 3) and in epoch 1
# after its first batch (k = 4); task-wise AdaMerging differs only in the coefficients' shape.
CASES = [
    ("adamerging_layer", "adamerging_layer", 8, (3, 4), "checkpoint"),
    ("tinting", "tinting_tiny", 12, (8,), "sigkill"),   # epoch 1, after its first batch
]


def _batches(loader, passes: int) -> list[list[int]]:
    """The sample indices of ``passes`` passes over ``loader``, as Lightning draws them (a fresh
    iterator per pass, ``len(loader)`` batches each)."""
    out = []
    for _ in range(passes):
        it = iter(loader)
        out += [next(it)[0].tolist() for _ in range(len(loader))]
    return out


@pytest.mark.parametrize("cut", [0, 2, 3, 5, 6])
def test_loader_state_resumes_the_sequence(cut):
    """A fresh loader given the state after ``cut`` batches continues the sequence (within a pass,
    at a pass's end, into the next pass)."""
    def loader():
        return ToyTasks(tasks=["a"], test_size=24, batch_size=8).train_dataloader().iterables["a"]

    whole, first = _batches(loader(), 3), loader()
    assert isinstance(first, ResumableLoader) and len(first) == 3 and len({tuple(b) for b in whole}) == 9
    it, seen = iter(first), []
    for _ in range(cut):
        if len(seen) % 3 == 0 and seen:
            it = iter(first)
        seen.append(next(it)[0].tolist())
    again = loader()
    again.load_state_dict(first.state_dict())
    it = iter(again)
    rest = [next(it)[0].tolist() for _ in range(3 - cut % 3)]   # the pass's rest, or after its end the next pass
    rest += _batches(again, (9 - cut - len(rest)) // 3)
    assert seen + rest == whole


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return H.tiny_work(tmp_path_factory, "resume")


def _outputs(config: str, out: str) -> list[str]:
    args = ["--model.init_args.coefficients_out", f"{out}/coefficients.safetensors"]
    return args + (["--model.init_args.heads_out", f"{out}/heads"] if config == "tinting_tiny" else [])


def _kill_at(work, cmd: list[str], marker, timeout: float = 240) -> None:
    """Start ``cmd``, wait until it holds at the pause step, SIGKILL it."""
    proc = H.start(work, cmd, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            assert proc.poll() is None, f"the run ended before the pause step:\n{proc.stderr.read()[-4000:]}"
            assert time.monotonic() < deadline, "the run did not reach the pause step"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -9


def _saved(out) -> dict[str, torch.Tensor]:
    tensors = {"coefficients": load_file(out / "coefficients.safetensors")["coefficients"]}
    for f in sorted((out / "heads").glob("*.safetensors")):
        tensors.update({f"{f.stem}.{k}": v for k, v in load_file(f).items()})
    return tensors


@pytest.mark.slow
@pytest.mark.skipif(not H.TVQ.is_file(), reason="the tvq console script is not installed")
@pytest.mark.parametrize("name, config, steps, at, how", CASES, ids=[c[0] for c in CASES])
def test_resumed_run_equals_uninterrupted(work, name, config, steps, at, how):
    ckpts, marker = work / f"{name}-ckpt", work / f"{name}-paused"
    # a run and its resumption write to the same place: with --ckpt_path FILE, LightningCLI takes the
    # model's arguments from the checkpoint's hyper-parameters, not from the command line
    outputs = _outputs(config, name)

    def command(max_steps: int, pause_at: int | None, *args, pause: bool = False) -> list[str]:
        callbacks = [H.checkpoint(ckpts, 1)] + ([H.pause(pause_at, marker)] if pause else [])
        return H.command(config, "--trainer.max_steps", max_steps, *DATA, *outputs, *args, callbacks=callbacks)

    if how == "sigkill":   # the uninterrupted run goes alongside (2 cores: the two take the time of one)
        (k,) = at
        whole = H.start(work, H.command(config, "--trainer.max_steps", steps, "--trainer.enable_checkpointing", "false",
                                        *DATA, *_outputs(config, f"{name}-whole")))
        try:
            _kill_at(work, command(steps, k, pause=True), marker)
            H.tvq(work, command(steps, k, "--ckpt_path", "last"))
            H.finish(whole)
        finally:
            whole.kill()
        ref = _saved(work / f"{name}-whole")
        _check(ckpts, ref, _saved(work / name), k, steps, config)
        return
    H.tvq(work, command(steps, None))   # resume the uninterrupted run from its checkpoint at each step k
    ref = _saved(work / name)
    for k in at:
        shutil.rmtree(work / name)
        H.tvq(work, command(steps, None, "--ckpt_path", ckpts / f"step={k}.ckpt"))
        _check(ckpts, ref, _saved(work / name), k, steps, config)


def _check(ckpts, ref: dict, resumed: dict, at: int, steps: int, config: str) -> None:
    assert torch.load(ckpts / f"step={at}.ckpt", map_location="cpu", weights_only=True)["global_step"] == at
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == steps
    assert not torch.equal(ref["coefficients"], torch.full_like(ref["coefficients"], 0.3))   # they trained
    assert sorted(ref) == sorted(resumed) and len(ref) == (5 if config == "tinting_tiny" else 1)
    for k, v in ref.items():
        assert torch.equal(v, resumed[k]), (k, at, (v - resumed[k]).abs().max())
