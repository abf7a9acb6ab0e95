"""The residual-block index of each key, detected from the keys themselves (for LiNeS).

A model's blocks are the children of its longest run of numbered modules: for open_clip
``transformer.resblocks.<i>.``, timm ``blocks.<i>.``, HF ``encoder.layers.<i>.`` / ``layer.<i>.``.
The prefix whose numbered children are most numerous wins; its number of distinct indices is the
depth L (12 for ViT-B/32, 24 for ViT-L/14 — not a hard-coded constant).
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

_NUMBERED = re.compile(r"^(.*?)(\d+)\.")


def detect_blocks(keys: Iterable[str]) -> tuple[dict[str, int], int]:
    """``({key: block index}, L)`` for keys inside the model's main stack of blocks."""
    keys = list(keys)
    by_prefix: dict[str, set[int]] = defaultdict(set)
    for k in keys:
        for m in re.finditer(r"(?:^|\.)(\d+)\.", k):
            prefix = k[: m.start(1)]
            by_prefix[prefix].add(int(m.group(1)))
    if not by_prefix:
        return {}, 0
    prefix = max(by_prefix, key=lambda p: (len(by_prefix[p]), -len(p)))
    indices = sorted(by_prefix[prefix])
    rank = {i: r for r, i in enumerate(indices)}
    out = {}
    for k in keys:
        if k.startswith(prefix):
            m = re.match(r"(\d+)\.", k[len(prefix):])
            if m and int(m.group(1)) in rank:
                out[k] = rank[int(m.group(1))]
    return out, len(indices)
