"""Shared helpers of the store tests: configs per scheme, building a store, the reference reads."""

from __future__ import annotations

from pathlib import Path

import torch

from tvq_lightning.quant.qtensor import QTensor
from tvq_lightning.quant.schemes import rtvq_quantize
from tvq_lightning.store import StoreConfig, TaskVectorStore, quantize_to_store


CONFIGS = {
    "fp32": StoreConfig(scheme="fp32"),
    "fq8": StoreConfig(scheme="fq", bits=8),
    "fq4": StoreConfig(scheme="fq", bits=4),
    "tvq8": StoreConfig(scheme="tvq", bits=8),
    "tvq4": StoreConfig(scheme="tvq", bits=4),
    "tvq3": StoreConfig(scheme="tvq", bits=3),
    "tvq2": StoreConfig(scheme="tvq", bits=2),
    "tvq1": StoreConfig(scheme="tvq", bits=1),
    "tvq4_group": StoreConfig(scheme="tvq", bits=4, granularity="group", group_size=100),
    "tvq3_channel": StoreConfig(scheme="tvq", bits=3, granularity="channel"),
    "tvq4_symmetric": StoreConfig(scheme="tvq", bits=4, symmetric=True),
    "fq4_channel": StoreConfig(scheme="fq", bits=4, granularity="channel"),
    "rtvq_b3o2": StoreConfig(scheme="rtvq", base_bits=3, offset_bits=2),
    "rtvq_b3o2_no_ec": StoreConfig(scheme="rtvq", base_bits=3, offset_bits=2, error_correction=False),
    "rtvq_group": StoreConfig(scheme="rtvq", base_bits=4, offset_bits=2, granularity="group", group_size=64),
    "rtvq_channel_sym": StoreConfig(scheme="rtvq", base_bits=3, offset_bits=3, granularity="channel", symmetric=True),
}


def build(weights, out: Path, cfg: StoreConfig, tasks: list[int] | None = None, **kw) -> TaskVectorStore:
    tasks = list(range(len(weights.fts))) if tasks is None else tasks
    quantize_to_store(weights.pre, {weights.names[i]: weights.fts[i] for i in tasks}, out, cfg, progress=False, **kw)
    return TaskVectorStore(out)


def quantized_keys(sd) -> list[str]:
    return [k for k, v in sd.items() if v.is_floating_point() and v.dim() >= 2]


def full_precision_keys(sd) -> list[str]:
    return [k for k, v in sd.items() if v.is_floating_point() and v.dim() < 2]


def reference(weights, cfg: StoreConfig, key: str) -> list[torch.Tensor]:
    """What the store must return for ``key``, computed from the quantizer directly."""
    taus = [weights.tau(i, key) for i in range(len(weights.fts))]
    if cfg.scheme == "fp32" or weights.pre[key].dim() < 2:
        return taus
    if cfg.scheme == "tvq":
        return [QTensor.quantize(t, cfg.spec(cfg.bits)).dequantize() for t in taus]
    if cfg.scheme == "fq":
        return [QTensor.quantize(f[key].float(), cfg.spec(cfg.bits)).dequantize() - weights.pre[key].float()
                for f in weights.fts]
    r = rtvq_quantize(taus, cfg.spec(cfg.base_bits), cfg.spec(cfg.offset_bits), cfg.error_correction)
    return [r.task_vector(i) for i in range(len(taus))]


def assert_no_error_residue(files_before, files_after):
    assert files_after == files_before, f"files changed: {set(files_after) ^ set(files_before) or 'contents'}"


