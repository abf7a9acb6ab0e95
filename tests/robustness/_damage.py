"""Ways to damage the files of a world: bit flips, truncation, edited state dicts and layouts."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tvq_lightning.store.checkpoints import load_state_dict, read_safetensors_header
from tvq_lightning.store.st_stream import save_safetensors
from tvq_lightning.store.layout import LAYOUT_CRC, layout_checksum


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def tensor_offset(path: Path, name: str, within: int = 0) -> int:
    """Absolute byte offset of ``within`` bytes into tensor ``name`` of a safetensors file."""
    entries, _, start = read_safetensors_header(path)
    return start + entries[name]["data_offsets"][0] + within


def flip_tensor(path: Path, name: str, within: int = 0) -> None:
    flip_bit(path, tensor_offset(path, name, within))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def edit_sd(path: Path, fn) -> None:
    """Rewrite checkpoint ``path`` with ``fn(state dict)`` applied (in place)."""
    sd = {k: v.clone() for k, v in load_state_dict(path).items()}
    fn(sd)
    os.unlink(path)
    save_safetensors(sd, path)


def edit_layout(store: Path, fn, reseal: bool = True) -> None:
    """Apply ``fn`` to the layout's JSON object; ``reseal``: recompute its checksum (a crafted layout)."""
    path = store / "layout.json"
    data = json.loads(path.read_text())
    fn(data)
    if reseal and LAYOUT_CRC in data:
        data[LAYOUT_CRC] = layout_checksum(data)
    path.write_text(json.dumps(data, indent=1) + "\n")


def task_file(store: Path, task: str) -> Path:
    return store / json.loads((store / "layout.json").read_text())["tasks"][task]["file"]


def set_tensor(sd: dict, key: str, value) -> None:
    sd[key] = value if isinstance(value, torch.Tensor) else value(sd[key])
