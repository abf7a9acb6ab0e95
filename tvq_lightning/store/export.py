"""Exporting one task of a store as a safetensors file (streamed, atomic)."""
from __future__ import annotations

from pathlib import Path


from ..errors import StoreError
from .io import SafetensorsStreamWriter, check_output, header_upper_bound
from .reader import TaskVectorStore
from .sources import open_source


def export_task(store_path: str | Path, task: str, out: str | Path, *, pretrained=None, finetuned_weights: bool = False,
                prefix: str | None = None, allow_pickle: bool = False, overwrite: bool = False) -> int:
    """Write ``task``'s fp32 task vector (or ``theta_0 + tau`` in theta_0's dtypes) to ``out``.

    Returns the bytes written. Keys are written one at a time; integer buffers (e.g. BatchNorm
    counters) of theta_0 are copied into the fine-tuned weights unchanged.
    """
    out = Path(out)
    check_output(out, overwrite)
    if not out.parent.exists():
        raise StoreError(f"{out.parent}: no such directory for --out; create it first")
    store = TaskVectorStore(store_path)
    if task not in store.layout.tasks:
        raise StoreError(f"store {store.path} has no task {task!r}; it has: {', '.join(store.tasks)}")
    pre = None
    if pretrained is not None:
        pre = open_source("pretrained", pretrained, prefix=prefix, allow_pickle=allow_pickle)
        store.check_pretrained(pre.sd, label=pre.label)
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
