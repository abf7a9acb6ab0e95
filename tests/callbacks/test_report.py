"""MultiTaskReport: collects test/<metric>/<task>, writes report.md / .json / .png into the log dir."""
from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from tvq_lightning.callbacks import MultiTaskReport
from tvq_lightning.callbacks.report import collect_task_metrics, markdown_table

warnings.filterwarnings("ignore", ".*does not have many workers.*")

TASKS = ["cars", "svhn", "dtd"]
ACC = {"cars": 0.5, "svhn": 0.75, "dtd": 1.0}


class LogsPerTask(pl.LightningModule):
    """Logs a fixed accuracy per test dataloader (task) and their mean, like the multi-task modules."""

    def __init__(self, stage: str = "test"):
        super().__init__()
        self.tasks, self.stage = TASKS, stage
        self.layer = torch.nn.Linear(1, 1)

    def _step(self, dataloader_idx: int) -> None:
        t = self.tasks[dataloader_idx]
        self.log(f"{self.stage}/acc/{t}", ACC[t], add_dataloader_idx=False)
        self.log(f"{self.stage}/loss/{t}", 1 - ACC[t], add_dataloader_idx=False)
        if dataloader_idx == len(self.tasks) - 1:
            self.log(f"{self.stage}/acc/avg", sum(ACC.values()) / 3, add_dataloader_idx=False)

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        self._step(dataloader_idx)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self._step(dataloader_idx)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def _loaders(self):
        return [DataLoader(TensorDataset(torch.ones(2, 1)), batch_size=2) for _ in self.tasks]

    def test_dataloader(self):
        return self._loaders()

    def val_dataloader(self):
        return self._loaders()

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(2, 1)), batch_size=2)


def _trainer(tmp_path, callbacks, logger=True, **kw):
    return pl.Trainer(default_root_dir=tmp_path, logger=CSVLogger(tmp_path) if logger else False, callbacks=callbacks,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, **kw)


def test_collect_orders_tasks_strips_dataloader_suffix_and_computes_avg():
    metrics = {"test/acc/b/dataloader_idx_1": torch.tensor(0.5), "test/acc/a/dataloader_idx_0": torch.tensor(1.0),
               "test/acc/z": 0.25, "train/acc/a": 0.0, "test/loss/a": 3.0}
    out = collect_task_metrics(metrics, "test", ["acc", "f1"], task_order=["a", "b"])
    assert list(out) == ["acc"]                                   # nothing logged for f1
    assert list(out["acc"]) == ["a", "b", "z", "avg"]             # given order, then others, avg last
    assert out["acc"]["avg"] == pytest.approx((1.0 + 0.5 + 0.25) / 3)
    logged = collect_task_metrics({"test/acc/a": 1.0, "test/acc/avg": 0.1}, "test", ["acc"])
    assert logged["acc"]["avg"] == 0.1                            # a logged avg is kept as is


def test_markdown_table():
    md = markdown_table({"acc": {"a": 0.5, "b": 0.25, "avg": 0.375}}, scale=100.0)
    assert md.splitlines() == ["| task | acc (%) |", "|---|---:|", "| a | 50.00 |", "| b | 25.00 |",
                               "| **avg** | **37.50** |"]


def test_report_written_on_test_end(tmp_path):
    cb = MultiTaskReport(metrics=["acc", "loss"])
    trainer = _trainer(tmp_path, [cb])
    trainer.test(LogsPerTask(), verbose=False)
    log_dir = tmp_path / "lightning_logs" / "version_0"
    assert trainer.log_dir == str(log_dir)
    assert sorted(p.name for p in cb.paths) == ["report.json", "report.md", "report.png"]
    assert all(p.parent == log_dir for p in cb.paths)
    report = json.loads((log_dir / "report.json").read_text())
    assert report["tasks"] == TASKS and report["stage"] == "test" and report["metrics"] == ["acc", "loss"]
    assert report["values"]["acc"] == pytest.approx({**ACC, "avg": 0.75})
    assert report["values"]["loss"]["svhn"] == pytest.approx(0.25)
    md = (log_dir / "report.md").read_text()
    assert "| task | acc (%) | loss (%) |" in md and "| svhn | 75.00 | 25.00 |" in md and "**75.00**" in md
    assert (log_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_out_dir_without_logger_and_no_plot(tmp_path):
    cb = MultiTaskReport(out_dir=str(tmp_path / "out"), plot=False, filename="acc", percent=False)
    _trainer(tmp_path, [cb], logger=False).test(LogsPerTask(), verbose=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["acc.json", "acc.md"]
    assert "| dtd | 1.00 |" in (tmp_path / "out" / "acc.md").read_text()
    cb2 = MultiTaskReport()       # no logger, no out_dir: the trainer's root directory
    _trainer(tmp_path / "root", [cb2], logger=False).test(LogsPerTask(), verbose=False)
    assert (tmp_path / "root" / "report.md").is_file()


def test_validation_stage_skips_sanity_check(tmp_path):
    cb = MultiTaskReport(stage="val", plot=False)
    calls, write = [], cb.write
    cb.write = lambda trainer, module: calls.append(trainer.sanity_checking) or write(trainer, module)
    _trainer(tmp_path, [cb], max_steps=1, num_sanity_val_steps=1).fit(LogsPerTask(stage="val"))
    assert calls == [False]                                       # once, after training; not in the sanity check
    assert cb.report is not None and cb.report["stage"] == "val" and cb.report["global_step"] == 1
    assert (tmp_path / "lightning_logs" / "version_0" / "report.md").is_file()


def test_nothing_logged_or_not_rank_zero_writes_nothing(tmp_path):
    cb = MultiTaskReport(out_dir=str(tmp_path / "x"))
    module = SimpleNamespace(tasks=TASKS)
    fake = SimpleNamespace(callback_metrics={"test/acc/a": 1.0}, is_global_zero=False, datamodule=None,
                           log_dir=None, default_root_dir=str(tmp_path), global_step=0)
    assert cb.write(fake, module) is None
    fake.is_global_zero, fake.callback_metrics = True, {"train/loss": 1.0}
    assert cb.write(fake, module) is None
    assert not (tmp_path / "x").exists()


def test_every_rank_resolves_the_log_dir(tmp_path):
    """``trainer.log_dir`` broadcasts under DDP: every rank asks for it (else rank 0 waits for ranks
    that already left); only rank zero writes."""
    calls = []

    class Rank1Trainer:
        is_global_zero = False
        callback_metrics = {"test/acc/cars": torch.tensor(0.5)}
        datamodule = None
        default_root_dir = str(tmp_path)
        global_step = 0

        @property
        def log_dir(self):
            calls.append(1)
            return str(tmp_path)

    assert MultiTaskReport().write(Rank1Trainer(), LogsPerTask()) is None
    assert calls == [1] and not list(tmp_path.iterdir())
