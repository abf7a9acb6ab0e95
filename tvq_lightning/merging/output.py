"""Writing merge results: one complete state dict, or a compact per-task artifact.

Single-model methods write ``MERGED.safetensors`` with every key of theta_0 (keys no task changes
and integer buffers are theta_0's). Per-task methods (EMR, TALL) write a directory::

    ARTIFACT/merge.json          method, options, tasks, per-task scales, fingerprint of theta_0
    ARTIFACT/shared.safetensors  the shared vector per key (float32)
    ARTIFACT/masks.safetensors   per key and task, the boolean mask packed 8 per byte (``key#m<t>``)

``tvq export --store ARTIFACT --task NAME --pretrained PATH`` turns it into task NAME's model
theta_0 + scale_t * mask_t * shared.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import StoreError, TvqError
from ..quant.packing import pack_codes, packed_nbytes, unpack_codes
from ..store.checkpoints import open_checkpoint
from ..store.fingerprint import fingerprint_state_dict
from ..store.export import is_tvq_safetensors
from ..store.io import atomic_write_json, check_output, clean_stale, output_errors, staged_directory
from ..store.st_stream import SafetensorsStreamWriter, header_upper_bound
from ..store.sources import open_source
from .base import PerTaskDelta
from .engine import MergePlan, iter_merged

ARTIFACT_FILE = "merge.json"
ARTIFACT_FORMAT = "tvq_lightning.per_task_merge"


def _header(plan: MergePlan, suffixes=("",)) -> int:
    specs, total = {}, 0
    for k in plan.pretrained.sd.keys():
        shape, _ = plan.pretrained.meta(k)
        n = 1
        for d in shape:
            n *= d
        for s in suffixes:
            specs[k + s] = ("F64", len(shape))
        total += 8 * n * len(suffixes)
    return header_upper_bound(specs, total)


def _meta(plan: MergePlan) -> dict[str, str]:
    return {"format": "tvq_lightning.merged", "method": plan.merger.describe(), "tasks": ",".join(plan.tasks),
            "store": str(plan.store.path), "scheme": plan.store.config.label, "pretrained": plan.store.fingerprint}


def write_merged(plan: MergePlan, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Run a single-model merge and write the complete state dict to ``out`` (atomic)."""
    out = Path(out)
    if plan.merger.per_task:
        raise TvqError(f"{plan.merger.name} gives one model per task: --out must be a directory (no .safetensors suffix)")
    check_output(out, overwrite, is_tvq_safetensors, what="merged safetensors file")
    t0 = time.perf_counter()
    with output_errors(out):
        clean_stale(out.parent, out.name)
        with SafetensorsStreamWriter(out, _header(plan), _meta(plan)) as w:
            for key, merged, _ in iter_merged(plan):
                w.add(key, merged.cpu())
            nbytes = w.close()
    return {"out": str(out), "bytes": nbytes, "seconds": time.perf_counter() - t0, "method": plan.merger.describe(),
            **plan.merger.finalize()}


def write_per_task(plan: MergePlan, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Run a per-task merge and write the compact artifact directory ``out``."""
    out = Path(out)
    with output_errors(out):
        return _write_per_task(plan, out, overwrite)


def _write_per_task(plan: MergePlan, out: Path, overwrite: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    keys: dict[str, list[int]] = {}
    with staged_directory(out, overwrite=overwrite, replaceable=is_artifact, what="per-task merge artifact") as tmp:
        shared_w = SafetensorsStreamWriter(tmp / "shared.safetensors", _header(plan))
        mask_w = SafetensorsStreamWriter(tmp / "masks.safetensors",
                                         _header(plan, tuple(f"#m{i}" for i in range(len(plan.tasks)))))
        try:
            for key, merged, p in iter_merged(plan):
                if not isinstance(merged, PerTaskDelta):
                    continue  # theta_0's own tensor: not stored, export copies it
                keys[key] = list(p.shape)
                shared_w.add(key, merged.shared.float().cpu())
                for i, m in enumerate(merged.masks):
                    mask_w.add(f"{key}#m{i}", pack_codes(m.reshape(-1).to(torch.uint8).cpu(), 1))
            shared_w.close()
            mask_w.close()
        except BaseException:
            shared_w.abort()
            mask_w.abort()
            raise
        final = plan.merger.finalize()
        scales = [float(s) for s in final.get("scales", [1.0] * len(plan.tasks))]
        atomic_write_json(tmp / ARTIFACT_FILE, {
            "format": ARTIFACT_FORMAT, "version": 1, "method": plan.merger.name, "describe": plan.merger.describe(),
            "tasks": plan.tasks, "scales": scales, "pretrained": plan.store.fingerprint, "store": str(plan.store.path),
            "scheme": plan.store.config.label, "keys": keys, "extra": {k: v for k, v in final.items() if k != "scales"},
        })
    nbytes = sum(p.stat().st_size for p in out.iterdir())
    return {"out": str(out), "bytes": nbytes, "seconds": time.perf_counter() - t0, "method": plan.merger.describe(),
            "scales": scales}


def is_artifact(path: str | Path) -> bool:
    """Whether ``path`` is a per-task merge artifact directory (its ``merge.json`` has the format)."""
    try:
        meta = json.loads((Path(path) / ARTIFACT_FILE).read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and meta.get("format") == ARTIFACT_FORMAT


def read_artifact(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        meta = json.loads((path / ARTIFACT_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StoreError(f"{path / ARTIFACT_FILE} is unreadable ({e}); re-run `tvq merge`") from None
    if meta.get("format") != ARTIFACT_FORMAT or meta.get("version") != 1:
        raise StoreError(f"{path} is not a per-task merge artifact of a version this tvq_lightning reads; re-run `tvq merge`")
    return meta


def task_model_tensors(path: str | Path, task: str, pretrained) -> tuple[dict[str, Any], Any]:
    """``(meta, iterator of (key, tensor))`` of task ``task``'s model from an artifact."""
    path = Path(path)
    meta = read_artifact(path)
    if task not in meta["tasks"]:
        raise StoreError(f"merge artifact {path} has no task {task!r}; it has: {', '.join(meta['tasks'])}")
    t = meta["tasks"].index(task)
    pre = open_source("pretrained", pretrained)
    fp = fingerprint_state_dict(pre.sd)
    if fp != meta["pretrained"]:
        raise StoreError(f"{pre.label} are not the pre-trained weights merge artifact {path} was made with; pass the same --pretrained as for `tvq merge`")
    shared = open_checkpoint(path / "shared.safetensors")
    masks = open_checkpoint(path / "masks.safetensors")
    scale = meta["scales"][t]

    def gen():
        for key in pre.sd.keys():
            p = pre.sd[key]
            if key not in meta["keys"]:
                yield key, p
                continue
            n = p.numel()
            mask = unpack_codes(masks[f"{key}#m{t}"], 1, n).view(p.shape).bool()
            delta = torch.where(mask, shared[key].float() * scale, torch.zeros(()))
            yield key, (p.float() + delta).to(p.dtype)

    return meta, gen()


def export_task_model(path: str | Path, task: str, pretrained, out: str | Path, overwrite: bool = False) -> int:
    out = Path(out)
    check_output(out, overwrite, is_tvq_safetensors, what="safetensors file")
    meta, items = task_model_tensors(path, task, pretrained)
    pre = open_source("pretrained", pretrained)
    specs = {k: ("F64", len(pre.meta(k)[0])) for k in pre.sd.keys()}
    total = sum(8 * max(1, pre.sd[k].numel()) for k in pre.sd.keys())
    with output_errors(out), SafetensorsStreamWriter(out, header_upper_bound(specs, total), {
            "format": "tvq_lightning.export", "task": task, "method": meta["describe"]}) as w:
        for k, v in items:
            w.add(k, v)
        return w.close()


def artifact_summary(path: str | Path) -> dict[str, Any]:
    meta = read_artifact(path)
    path = Path(path)
    nbytes = sum(p.stat().st_size for p in path.iterdir())
    n = sum(int(torch.Size(s).numel()) for s in meta["keys"].values())
    return {"path": str(path), "method": meta["describe"], "tasks": meta["tasks"], "scales": meta["scales"],
            "bytes_on_disk": nbytes, "fp32_checkpoint_bytes": 4 * n,
            "ratio_to_fp32": nbytes / (4 * n * len(meta["tasks"])) if n else float("nan"),
            "mask_bytes": sum(packed_nbytes(int(torch.Size(s).numel()), 1) for s in meta["keys"].values()) * len(meta["tasks"])}
