"""Zero-shot classification heads from class names and prompt templates (the CLIP protocol).

For each class, every template is filled with the class name, encoded by the text tower, L2-
normalised and averaged; the mean is normalised again, and the rows are scaled by the model's
``exp(logit_scale)``. The head then computes ``exp(logit_scale) * <normalize(image_embedding), row>``
exactly as CLIP's zero-shot evaluation. Works for any model with ``encode_text`` and
``logit_scale`` (open_clip ``CLIP`` with ``open_clip.get_tokenizer(name)``, or
:class:`~.tiny_clip.TinyClip` with its ``tokenizer``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import TvqError
from .heads import ClassificationHead


@torch.no_grad()
def zeroshot_head(model: nn.Module, tokenizer: Callable[[list[str]], Tensor], classnames: Sequence[str],
                  templates: Sequence[str]) -> ClassificationHead:
    """The zero-shot head of one task (see the module docstring)."""
    if not classnames or not templates:
        raise TvqError("a zero-shot head needs at least one class name and one template")
    if any("{}" not in t for t in templates):
        raise TvqError(f"every template needs a '{{}}' for the class name: {list(templates)}")
    device = next(model.parameters()).device
    rows = []
    for name in classnames:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1).mean(0)
        rows.append(F.normalize(emb, dim=0))
    scale = model.logit_scale.exp().float() if hasattr(model, "logit_scale") else torch.tensor(100.0)
    return ClassificationHead((torch.stack(rows) * scale).cpu())


def zeroshot_heads(model: nn.Module, tokenizer: Callable[[list[str]], Tensor],
                   tasks: Mapping[str, tuple[Sequence[str], Sequence[str]]]) -> dict[str, ClassificationHead]:
    """``{task: zeroshot_head(...)}`` for ``tasks = {task: (classnames, templates)}``."""
    return {t: zeroshot_head(model, tokenizer, names, templates) for t, (names, templates) in tasks.items()}
