"""Mapping-valued options after a ``-c`` config: whole replacement, dotted edits, errors."""
from __future__ import annotations

import pytest

from tvq_lightning.cli.mapping_options import apply_mapping_edits, take_mapping_options
from tvq_lightning.cli.sweep import build_parser
from tvq_lightning.errors import UsageError

CONFIG = """data:
  class_path: tvq_lightning.data.zoo.CLIPSuiteDataModule
  init_args: {root: data, batch_size: 128}
trainer: {accelerator: auto, devices: 1}
finetuned: {a: a.pt}
"""


@pytest.fixture
def config(tmp_path):
    p = tmp_path / "sweep.yaml"
    p.write_text(CONFIG)
    return str(p)


def test_dotted_edits_land_where_lightning_cli_puts_them(config):
    ns = build_parser().parse(["-c", config, "--data.init_args.root", "/x", "--data.batch_size=4",
                               "--trainer.devices", "2", "--trainer.strategy", "ddp", "--finetuned.b", "b.pt"])
    assert ns.data == {"class_path": "tvq_lightning.data.zoo.CLIPSuiteDataModule",
                       "init_args": {"root": "/x", "batch_size": 4}}
    assert ns.trainer == {"accelerator": "auto", "devices": 2, "strategy": "ddp"}
    assert ns.finetuned == {"a": "a.pt", "b": "b.pt"}


def test_whole_mapping_after_a_config_replaces_it(config):
    """jsonargparse alone fails here (a class_path mapping given twice)."""
    ns = build_parser().parse(["-c", config, "--data", "{class_path: X, init_args: {root: /y}}"])
    assert ns.data == {"class_path": "X", "init_args": {"root": "/y"}}
    ns = build_parser().parse(["-c", config, "--data", "{class_path: X}", "--data.init_args.root", "/z"])
    assert ns.data == {"class_path": "X", "init_args": {"root": "/z"}}


def test_edits_are_applied_in_order_and_values_are_yaml():
    argv, edits = take_mapping_options(["--out", "o", "--t.a", "1", "--t.a=[1, 2]", "--u", "{k: v}"], ["t", "u"])
    assert argv == ["--out", "o"]
    assert apply_mapping_edits({"t": {"a": 0}}, edits) == {"t": {"a": [1, 2]}, "u": {"k": "v"}}


def test_print_config_shows_the_edits(config, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse(["-c", config, "--data.root", "/p", "--print_config"])
    assert e.value.code == 0
    assert "root: /p" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--data", "[1]"], "--data expects a mapping"),
    (["--data.x", "{"], "is not valid YAML"),
    (["--data.a..b", "1"], "empty key"),
    (["--data.x"], "expects a value"),
])
def test_errors_are_one_line(argv, words):
    with pytest.raises(UsageError, match=words) as e:
        build_parser().parse(argv)
    assert "\n" not in str(e.value)
