"""FineTuneModule: the encoder learns, the head stays frozen, errors name the mismatch."""
import copy
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch

from tvq_lightning.data import ToyTasks
from tvq_lightning.errors import TvqError
from tvq_lightning.models.heads import ClassificationHead
from tvq_lightning.modules.finetune import FineTuneModule, cosine_with_warmup
from tvq_lightning.store import fingerprint_state_dict
from tvq_lightning.testing import TinyEncoder

warnings.filterwarnings("ignore", ".*does not have many workers.*")
QUIET = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False)


def encoder() -> TinyEncoder:
    torch.manual_seed(0)
    enc = TinyEncoder(width=32, depth=1, heads=2, patch=4, image=16, out_dim=16)
    with torch.no_grad():
        enc.proj.normal_(0, 32 ** -0.5)
    return enc


def toy(task: str = "a", **kw) -> ToyTasks:
    args = dict(tasks=("a", "b"), num_classes=4, image_size=16, train_size=128, val_size=256, test_size=64,
                noise=3.0, batch_size=16, train_task=task)
    return ToyTasks(**{**args, **kw})


def fit(module, dm, steps: int = 30, **kw) -> pl.Trainer:
    pl.seed_everything(0)
    trainer = pl.Trainer(max_steps=steps, num_sanity_val_steps=0, limit_val_batches=0, **{**QUIET, **kw})
    trainer.fit(module, dm)
    return trainer


def val_acc(module, dm) -> float:
    return pl.Trainer(**QUIET).validate(module, dm, verbose=False)[0]["val/acc"]


def test_finetune_beats_frozen_start_head_frozen_encoder_changes():
    enc, dm = encoder(), toy()
    start = copy.deepcopy(enc)
    module = FineTuneModule(enc, "a", lr=3e-3, warmup_steps=2, probe_steps=100)
    assert module.start_fingerprint == fingerprint_state_dict(start.state_dict())
    fit(module, dm)
    head = module.head
    assert not any(p.requires_grad for p in head.parameters())
    frozen = FineTuneModule(start, "a", head=ClassificationHead(head.weight, head.bias))
    acc0, acc1 = val_acc(frozen, dm), val_acc(module, dm)
    assert acc1 > acc0 + 0.05, (acc0, acc1)
    # the head is the probe fitted on the starting encoder, untouched by training
    from tvq_lightning.models.probe import fit_linear_probe
    probe = fit_linear_probe(start, dm.train_dataloader(), 4, steps=100)
    assert torch.equal(head.weight, probe.weight) and torch.equal(head.bias, probe.bias)
    changed = [k for k, v in enc.state_dict().items() if not torch.equal(v, start.state_dict()[k])]
    assert len(changed) == len(start.state_dict())


def test_given_head_stays_identical_and_trainable_regex():
    enc, dm = encoder(), toy()
    start = copy.deepcopy(enc.state_dict())
    head = ClassificationHead(torch.randn(4, 16), torch.zeros(4))
    module = FineTuneModule(enc, "a", head=copy.deepcopy(head), lr=1e-2, warmup_steps=1,
                            trainable=r"^blocks\.0\.linear")
    fit(module, dm, steps=3)
    assert torch.equal(module.head.weight, head.weight) and torch.equal(module.head.bias, head.bias)
    changed = {k for k, v in enc.state_dict().items() if not torch.equal(v, start[k])}
    assert changed == {"blocks.0.linear1.weight", "blocks.0.linear1.bias", "blocks.0.linear2.weight",
                       "blocks.0.linear2.bias"}
    with pytest.raises(TvqError, match="matches no encoder parameter"):
        FineTuneModule(encoder(), "a", head=head, trainable="^nothing")


def test_head_class_count_mismatch():
    head3 = ClassificationHead(torch.randn(3, 16))
    with pytest.raises(TvqError, match=r"head of task 'a' has 3 classes but the datamodule's task 'a' gives 4"):
        fit(FineTuneModule(encoder(), "a", head=head3), toy(), steps=1)
    with pytest.raises(TvqError, match="has 3 classes but num_classes gives 4"):
        FineTuneModule(encoder(), "a", head=head3, num_classes=4)
    with pytest.raises(TvqError, match="num_classes=5 but the datamodule's task 'a' has 4"):
        fit(FineTuneModule(encoder(), "a", num_classes=5), toy(), steps=1)


def test_task_and_head_errors(tmp_path):
    with pytest.raises(TvqError, match="train_task is 'b'; set data.train_task: a"):
        fit(FineTuneModule(encoder(), "a"), toy("b"), steps=1)
    with pytest.raises(TvqError, match="task 'z' is not in the datamodule's tasks"):
        fit(FineTuneModule(encoder(), "z"), toy(), steps=1)
    with pytest.raises(TvqError, match="has no head"):
        pl.Trainer(**QUIET).validate(FineTuneModule(encoder(), "a"), toy(), verbose=False)
    head = ClassificationHead(torch.randn(4, 16))
    head.save(tmp_path / "h.safetensors")
    with pytest.raises(TvqError, match="either head or head_path"):
        FineTuneModule(encoder(), "a", head=head, head_path=str(tmp_path / "h.safetensors"))
    m = FineTuneModule(encoder(), "a", head_path=str(tmp_path / "h.safetensors"))
    assert torch.equal(m.head.weight, head.weight)


def test_checkpoint_keeps_head_and_start_fingerprint(tmp_path):
    enc, dm = encoder(), toy()
    module = FineTuneModule(enc, "a", lr=1e-3, warmup_steps=1, probe_steps=20)
    trainer = fit(module, dm, steps=2)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    fresh = TinyEncoder(width=32, depth=1, heads=2, patch=4, image=16, out_dim=16)
    loaded = FineTuneModule.load_from_checkpoint(tmp_path / "last.ckpt", encoder=fresh)
    assert torch.equal(loaded.head.weight, module.head.weight)
    assert loaded.start_fingerprint == module.start_fingerprint != fingerprint_state_dict(enc.state_dict())
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in fresh.state_dict().items())
    assert loaded.task == "a" and loaded.lr == 1e-3


def test_schedule_warmup_then_cosine():
    f = cosine_with_warmup(4, 20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and math.isclose(f(12), 0.5) and f(20) == pytest.approx(0.0, abs=1e-12)
    assert cosine_with_warmup(2, None)(100) == 1.0


def test_short_run_scales_warmup():
    module = FineTuneModule(encoder(), "a", lr=1.0, warmup_steps=500, probe_steps=1)
    trainer = fit(module, toy(), steps=20)
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.lr_lambdas[0](0) == 0.5  # warm-up over 10 % of 20 steps, not 500


@pytest.mark.parametrize("precision, fused", [("32-true", True), ("bf16-mixed", False)])
def test_adamw_fused_unless_mixed_precision(precision, fused):
    """The fused AdamW kernel where it is safe; ``foreach`` under mixed precision (Lightning clips
    gradients there, which an optimizer that unscales them itself does not allow)."""
    module = FineTuneModule(encoder(), "a", lr=1e-3, warmup_steps=1, probe_steps=1)
    trainer = fit(module, toy(), steps=2, precision=precision, gradient_clip_val=1.0)
    defaults = trainer.optimizers[0].defaults
    assert bool(defaults["fused"]) is fused and bool(defaults["foreach"]) is not fused
