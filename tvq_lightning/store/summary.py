"""What ``tvq inspect`` reports about a store, as a plain dict (also used by the demo and benchmarks)."""
from __future__ import annotations

from collections import Counter
from typing import Any

from ..errors import StoreError
from .fingerprint import short_fingerprint
from .layout import StoreConfig
from .reader import TaskVectorStore


def bits_per_param(store: TaskVectorStore) -> float:
    """Theoretical bits per quantized parameter per task, weighted by element counts (the scheme's
    ``Scheme.bits_per_param``: ``b``, or ``b_off + b_base / T`` with a shared base)."""
    keys = [k for k in store.layout.keys.values() if k.quantized]
    n = sum(k.numel for k in keys)
    if not n:
        return 32.0
    t = max(1, len(store.tasks))
    impl = store.scheme_impl
    return sum(k.numel * impl.bits_per_param(k, t) for k in keys) / n


def summarize(store: TaskVectorStore, strict: bool = True) -> dict[str, Any]:
    """The numbers ``tvq inspect`` shows. A store missing a data file is refused (``strict``: a
    :class:`StoreError` naming the file) or reported under ``missing_files`` (``healthy`` False);
    ``verified`` says whether the layout records checksums (``tvq inspect --verify`` checks them)."""
    lay = store.layout
    missing = [p.relative_to(store.path).as_posix() for p in store.missing_files()]
    if missing and strict:
        owner = next((n for n, t in lay.files().items() if t.file == missing[0]), "?")
        raise StoreError(f"store {store.path} is missing {missing[0]} (of {owner}; {len(missing)} file(s) missing "
                         f"in all): the store is incomplete; restore the file or re-create the store with `tvq quantize`")
    keys = lay.keys.values()
    q_params = sum(k.numel for k in keys if k.quantized)
    fp_params = sum(k.numel for k in keys if not k.quantized)
    bits = Counter()
    for k in keys:
        if k.quantized:
            bits[store.scheme_impl.width_label(k)] += k.numel
    nbytes = store.nbytes()
    per_task = lay.fp32_checkpoint_bytes
    t = len(store.tasks)
    bpp = bits_per_param(store)
    return {
        "path": str(store.path),
        "scheme": lay.config.label,
        "config": lay.config.to_json(),
        "tasks": store.tasks,
        "num_tasks": t,
        "pretrained_fingerprint": lay.fingerprint,
        "keys": len(lay.keys),
        "quantized_keys": sum(1 for k in keys if k.quantized),
        "quantized_params": q_params,
        "full_precision_params": fp_params,
        "bits_histogram": dict(bits),
        "bits_per_param": bpp if q_params else 32.0,
        "bytes_on_disk": nbytes,
        "fp32_checkpoint_bytes": per_task,
        "ratio_to_fp32": nbytes / (t * per_task) if t and per_task else float("nan"),
        "theoretical_ratio": (bpp * q_params + 32 * fp_params) / (32 * (q_params + fp_params)) if t else float("nan"),
        "theoretical_ratio_quantized_only": bpp / 32,
        "allocation": lay.allocation,
        "generation": lay.generation,
        "layout_version": lay.version,
        "checksums": lay.verifiable,
        "missing_files": missing,
        "healthy": not missing,
    }


def format_summary(s: dict[str, Any]) -> str:
    cfg = StoreConfig.from_json(s["config"])
    lines = [
        f"store      {s['path']}",
        f"scheme     {s['scheme']}  ({cfg.scheme_impl.detail(cfg)})",
        f"tasks      {s['num_tasks']}: {', '.join(s['tasks'])}",
        f"pretrained {short_fingerprint(s['pretrained_fingerprint'])}",
        f"keys       {s['keys']} ({s['quantized_keys']} quantized: {s['quantized_params']:,} params; "
        f"{s['full_precision_params']:,} params in full precision)",
        f"bits       {s['bits_per_param']:.3f} per quantized param per task"
        + (f"  [{', '.join(f'{b}: {n:,}' for b, n in sorted(s['bits_histogram'].items()))}]" if len(s["bits_histogram"]) > 1 else ""),
        f"on disk    {s['bytes_on_disk']:,} bytes = {100 * s['ratio_to_fp32']:.2f} % of {s['num_tasks']} fp32 checkpoints "
        f"({s['num_tasks']} x {s['fp32_checkpoint_bytes']:,} bytes); theory {100 * s['theoretical_ratio']:.2f} %",
    ]
    if s.get("missing_files"):
        lines.append(f"MISSING    {', '.join(s['missing_files'])}: the store is incomplete")
    if s.get("checksums") is False:
        lines.append(f"integrity  layout version {s.get('layout_version')}: no checksums (`tvq inspect STORE --upgrade` records them)")
    if s.get("allocation"):
        lines.append(f"allocation {s['allocation'].get('description', s['allocation'])}")
    return "\n".join(lines)
