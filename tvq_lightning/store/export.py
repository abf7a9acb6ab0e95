"""Exporting one task of a store as a safetensors file (streamed, atomic)."""
from __future__ import annotations

import json
from pathlib import Path


from ..errors import StoreError
from .io import check_output, clean_stale, output_errors
from .st_stream import SafetensorsStreamWriter, header_upper_bound
from .reader import TaskVectorStore
from .sources import open_source


def is_tvq_safetensors(path: Path, formats: tuple[str, ...] = ("tvq_lightning.merged", "tvq_lightning.export")) -> bool:
    """Whether ``path`` is a safetensors file tvq wrote as an output (its ``__metadata__`` format)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100 << 20:
                return False
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and meta.get("format") in formats


def export_task(store_path: str | Path, task: str, out: str | Path, *, pretrained=None, finetuned_weights: bool = False,
                prefix: str | None = None, allow_pickle: bool = False, overwrite: bool = False,
                trust_pickle_code: bool = False) -> int:
    """Write ``task``'s fp32 task vector (or ``theta_0 + tau`` in theta_0's dtypes) to ``out``.

    Returns the bytes written. Keys are written one at a time; integer buffers (e.g. BatchNorm
    counters) of theta_0 are copied into the fine-tuned weights unchanged.
    """
    out = Path(out)
    check_output(out, overwrite, is_tvq_safetensors, what="safetensors file")
    with output_errors(out):
        return _export(store_path, task, out, pretrained, finetuned_weights, prefix,
                       {"allow_pickle": allow_pickle, "trust_pickle_code": trust_pickle_code})


def _export(store_path, task: str, out: Path, pretrained, finetuned_weights: bool, prefix, pickles: dict) -> int:
    store = TaskVectorStore(store_path)
    if task not in store.layout.tasks:
        raise StoreError(f"store {store.path} has no task {task!r}; it has: {', '.join(store.tasks)}")
    pre = None
    if pretrained is not None:
        pre = open_source("pretrained", pretrained, prefix=prefix, **pickles)
        store.check_pretrained(pre.sd, label=pre.label)
        store.check_layout(pre)
    elif store.needs_pretrained or finetuned_weights:
        raise StoreError(f"store {store.path} ({store.config.label}) needs the pre-trained weights to export {task!r}; pass --pretrained")
    keys = list(pre.sd.keys()) if (finetuned_weights and pre is not None) else store.keys
    specs, total = {}, 0
    for k in keys:
        shape = store.layout.keys[k].shape if k in store.layout.keys else tuple(pre.meta(k)[0])
        specs[k] = ("F64", len(shape))
        n = 1
        for d in shape:
            n *= d
        total += 8 * n
    meta = {"format": "tvq_lightning.export", "task": task, "content": "finetuned" if finetuned_weights else "task_vector",
            "scheme": store.config.label, "pretrained": store.fingerprint}
    clean_stale(out.parent, out.name)
    with SafetensorsStreamWriter(out, header_upper_bound(specs, total), meta) as w:
        for k in keys:
            if k not in store.layout.keys:  # integer buffers: theta_0's
                w.add(k, pre.sd[k])
                continue
            p = pre.sd[k] if pre is not None else None
            tau = store.task_vector(task, k, p)
            if finetuned_weights:
                w.add(k, tau.add_(p.float()).to(p.dtype))
            else:
                w.add(k, tau)
        return w.close()
