"""Two DDP processes equal one, through the ``tvq`` console script (``--trainer.strategy ddp
--trainer.devices 2 --trainer.accelerator cpu``; tests/cli/test_recipes_ddp.py only checks that
every recipe exits 0 under DDP, and tests/modules' DDP scripts call the modules in Python).

- ``tvq test`` (MergedEvaluation): the per-task accuracies are equal, exactly. Each test set has
  45 samples (odd): the evaluation loaders shard without padding, so both runs count every sample
  once (the accuracies are multiples of 1/45) and the all-reduced metrics are the same numbers.
- ``tvq fit`` of AdaMerging (layer-wise), Tinting++ and Surgery: the trained parameters
  (coefficients, tinted heads, surgery adapters, read from the final checkpoint) agree to
  ``atol=1e-6``. Each rank gets half of every global batch, so the one-process run uses twice the
  per-rank batch; the training sampler differs (one process: ``RandomSampler``; DDP: Lightning's
  ``DistributedSampler``), so the batch is each task's whole unlabelled set (32 images), where the
  order cannot matter: every step sees the same samples. What is left is the order of float
  sums (two half-batch means averaged by DDP against one mean; gradients summed in another order),
  a few float32 ulps of the ~0.3 coefficients after 4 Adam steps (observed <= 3e-8); 1e-6 leaves
  room without hiding a real difference (Tinting before its kept-share weighting: 7e-4).
"""
from __future__ import annotations

import json

import pytest
import torch

import _resume_helpers as H

SIZE, STEPS = 32, 4
FITS = {   # name: (config, extra arguments, parameters compared)
    "adamerging": ("adamerging_layer", ["--model.init_args.lr", "0.01"], ("coefficients",)),
    "tinting": ("tinting_tiny", [], ("coefficients", "model.heads.")),
    "surgery": ("surgery_tiny", ["--model.init_args.coefficients", "null", "--model.init_args.method", "task_arithmetic",
                                 "--model.init_args.method_options", "{scaling: 0.3}"], ("adapters.",)),
}

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not H.TVQ.is_file(), reason="the tvq console script is not installed")]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return H.tiny_work(tmp_path_factory, "ddp-equality")


def _one_and_ddp(work, command) -> None:
    """Run ``command("one", [])`` alongside ``command("ddp", DDP)`` (rank 0 idles while rank 1 starts)."""
    one = H.start(work, command("one", []))
    try:
        out, err = H.tvq(work, command("ddp", H.DDP))
        assert "Starting with 2 processes" in out + err
        out, err = H.finish(one)
        assert "Starting with" not in out + err
    finally:
        one.kill()


def test_evaluation_metrics_equal_one_process(work):
    n = 45

    def command(tag, ddp):
        report = {"class_path": "tvq_lightning.callbacks.report.MultiTaskReport",
                  "init_args": {"out_dir": f"eval-{tag}", "plot": False}}
        return H.command("evaluate_tiny", "--data.init_args.test_size", n, "--data.init_args.eval_batch_size", 8, *ddp,
                         callbacks=[report])

    _one_and_ddp(work, command)
    acc = {tag: json.loads((work / f"eval-{tag}" / "report.json").read_text())["values"]["acc"] for tag in ("one", "ddp")}
    assert acc["ddp"] == acc["one"] and sorted(acc["one"]) == ["a", "avg", "b"]
    for t in ("a", "b"):   # k / 45: every sample counted once (a padded 46th would give k / 46)
        k = acc["one"][t] * n
        assert abs(k - round(k)) < 1e-4 and 0 < round(k) < n, acc["one"]


@pytest.mark.parametrize("name", FITS)
def test_fit_equals_one_process(work, name):
    config, extra, compared = FITS[name]

    def command(tag, ddp):   # the same global batch: 2 ranks x SIZE / 2
        batch = SIZE // 2 if ddp else SIZE
        return H.command(config, "--trainer.max_steps", STEPS, "--test_after_fit", "false", "--data.init_args.test_size",
                         SIZE, "--data.init_args.batch_size", batch, *ddp, *extra,
                         callbacks=[H.checkpoint(work / f"{name}-{tag}", STEPS)])

    _one_and_ddp(work, command)
    one, ddp = ({k: v for k, v in H.state_dict(work / f"{name}-{tag}" / f"step={STEPS}.ckpt").items()
                 if k.startswith(compared)} for tag in ("one", "ddp"))
    assert sorted(one) == sorted(ddp) and one
    for k, v in one.items():
        torch.testing.assert_close(ddp[k], v, rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    moved = one.get("coefficients", one.get("adapters.0.up.weight"))   # coefficients start at 0.3, up at 0
    assert moved is not None and not torch.equal(moved, torch.full_like(moved, 0.3 if "coefficients" in one else 0.0))
