"""Run by test_metrics_ddp.py: ``python _ddp_metrics_script.py RANK OUT`` (two processes, gloo on CPU).

Rank r updates the dense metrics with its shard of the batches of :func:`shards` (rank 1 also
gets an all-invalid batch, rank 0 one batch more) and writes ``OUT/rank<r>.json`` with compute().
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from _metric_data import C, depth_batch, normal_batch, seg_batch
from tvq_lightning.metrics import DepthMetrics, MetricEntry, NormalMetrics, SegmentationMetrics


def shards() -> dict[int, list[int]]:
    return {0: [0, 2, 4], 1: [1, 3]}


def batches(seeds: list[int], rank: int) -> dict[str, list]:
    extra = rank == 1
    return {"seg": [seg_batch(s) for s in seeds] + ([seg_batch(7, all_ignored=True)] if extra else []),
            "depth": [depth_batch(s) for s in seeds] + ([depth_batch(7, all_invalid=True)] if extra else []),
            "normal": [normal_batch(s) for s in seeds] + ([normal_batch(7, all_invalid=True)] if extra else [])}


def evaluate(data: dict[str, list]) -> dict[str, float]:
    """Every metric's compute() over ``data`` (under DDP: all-reduced over the ranks)."""
    metrics = {"seg": SegmentationMetrics(C), "depth": DepthMetrics(), "normal": NormalMetrics()}
    entry = MetricEntry(NormalMetrics(), "median")
    for kind, m in metrics.items():
        for b in data[kind]:
            m.update(*b)
    for b in data["normal"]:
        entry.update(*b)
    out = {f"{kind}/{k}": float(v) for kind, m in metrics.items() for k, v in m.compute().items()}
    out["entry/median"] = float(entry.compute())
    return out


def main(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{Path(out) / 'rendezvous'}", rank=rank, world_size=2)
    try:
        result = evaluate(batches(shards()[rank], rank))
    finally:
        dist.destroy_process_group()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
