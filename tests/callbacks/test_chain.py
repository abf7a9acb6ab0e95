"""The whole chain: fine-tune -> quantize-on-save -> merge from the store -> evaluate; and the
YAML snippets in callbacks/ drive the same callbacks through LightningCLI."""
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from tvq_lightning.callbacks import BitAllocation, QuantizeOnSave
from tvq_lightning.merging.engine import merge_state_dict
from tvq_lightning.models.multitask import MultiTaskModel
from tvq_lightning.store import TaskVectorStore, load_state_dict

ROOT = Path(__file__).resolve().parents[2]


@torch.no_grad()
def accuracy(model: MultiTaskModel, task: str, dm) -> float:
    model.eval()
    x, y = dm.split(task, "test").tensors
    return (model(x, task).argmax(-1) == y).float().mean().item()


def test_finetune_quantize_merge_evaluate(tmp_path, run):
    store, pre_file = tmp_path / "store", tmp_path / "pre.safetensors"
    runs = {t: run(t, [QuantizeOnSave(str(store), save_pretrained=str(pre_file))], steps=30) for t in ("a", "b")}
    pre = load_state_dict(pre_file)
    merged = merge_state_dict(str(store), pre, "task_arithmetic")
    s = TaskVectorStore(store)
    for k in ("conv1.weight", "blocks.0.linear1.weight", "ln_post.bias"):
        want = pre[k] + 0.3 * (s.task_vector("a", k) + s.task_vector("b", k))
        assert torch.allclose(merged[k], want, atol=1e-6), k
    heads = {t: r.module.head for t, r in runs.items()}
    enc = run.make_encoder()
    model = MultiTaskModel(enc, heads)
    zero = {t: accuracy(model, t, runs[t].dm) for t in heads}
    enc.load_state_dict(merged)
    acc = {t: accuracy(model, t, runs[t].dm) for t in heads}
    expert = {t: accuracy(MultiTaskModel(r.encoder, heads), t, r.dm) for t, r in runs.items()}
    for t in heads:  # measured: start ~0.46, merged ~0.6, expert ~0.75 (4 classes, chance 0.25)
        assert zero[t] + 0.05 < acc[t] < expert[t] + 0.05, (zero, acc, expert)


def _snippet_config(tmp_path: Path, name: str) -> Path:
    cfg = yaml.safe_load((ROOT / "callbacks" / f"{name}.yaml").read_text())
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("QuantizeOnSave"):
            cb["init_args"].update(store=str(tmp_path / "store"), save_pretrained=str(tmp_path / "pre.safetensors"))
    cfg["trainer"].update(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                          limit_val_batches=0)
    cfg["model"] = {"class_path": "tvq_lightning.modules.finetune.FineTuneModule",
                    "init_args": {"task": "a", "lr": 1e-3, "warmup_steps": 1, "probe_steps": 20,
                                  "encoder": {"class_path": "tvq_lightning.models.encoders.tiny_encoder",
                                              "init_args": {"width": 32, "depth": 1, "image": 16, "patch": 4,
                                                            "out_dim": 16, "seed": 0}}}}
    cfg["data"] = {"class_path": "tvq_lightning.data.ToyTasks",
                   "init_args": {"tasks": ["a", "b"], "image_size": 16, "train_size": 64, "batch_size": 16,
                                 "train_task": "a"}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(config: Path) -> LightningCLI:
    return LightningCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
                        subclass_mode_data=True, args=["-c", str(config)], run=False, save_config_callback=None)


def test_yaml_snippets_through_lightning_cli(tmp_path):
    cli = _cli(_snippet_config(tmp_path, "quantize_on_save"))
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, QuantizeOnSave)]
    assert cb.on == "end" and cb.config.bits == 4 and not cb.overwrite_task
    cli.trainer.fit(cli.model, cli.datamodule)
    assert TaskVectorStore(tmp_path / "store").tasks == ["a"]

    cli = _cli(_snippet_config(tmp_path / "ba", "bit_allocation"))
    kinds = [type(c) for c in cli.trainer.callbacks]
    assert QuantizeOnSave in kinds and BitAllocation in kinds
    cli.trainer.fit(cli.model, cli.datamodule)
    alloc = TaskVectorStore(tmp_path / "ba" / "store").layout.allocation
    assert alloc["budget"] == 3.0 and alloc["bits_per_param"] <= 3.0 + 1e-9 and "sensitivity" in alloc
