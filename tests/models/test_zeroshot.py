"""Zero-shot heads: normalised template means scaled by exp(logit_scale), classifying by text similarity."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tvq_lightning.errors import TvqError
from tvq_lightning.models.zeroshot import zeroshot_head, zeroshot_heads

NAMES = ("cat", "dog", "bird", "fish")
TEMPLATES = ("a {}", "a photo of a {}", "{} drawn")


class OneHotText(nn.Module):
    """A text encoder that maps a class name to its own axis, plus a template-dependent offset (so the
    templates' embeddings differ in direction and norm)."""

    def __init__(self, dim: int = 8, logit_scale: float | None = math.log(50.0)):
        super().__init__()
        self.dim = dim
        self.dummy = nn.Parameter(torch.zeros(1))
        if logit_scale is not None:
            self.logit_scale = nn.Parameter(torch.tensor(logit_scale))

    def tokenizer(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[next(i for i, n in enumerate(NAMES) if n in t), len(t)] for t in texts])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        z = 3.0 * F.one_hot(tokens[:, 0], self.dim).float()
        return z + (tokens[:, 1:] % 5) * F.one_hot(len(NAMES) + tokens[:, 1] % 4, self.dim).float()


def test_head_is_the_scaled_mean_of_normalised_template_embeddings():
    model = OneHotText()
    head = zeroshot_head(model, model.tokenizer, NAMES, TEMPLATES)
    assert head.weight.shape == (4, 8) and head.num_classes == 4 and torch.all(head.bias == 0)
    torch.testing.assert_close(head.weight.norm(dim=1), torch.full((4,), 50.0))
    for c, name in enumerate(NAMES):
        emb = model.encode_text(model.tokenizer([t.format(name) for t in TEMPLATES]))
        expected = F.normalize(F.normalize(emb, dim=-1).mean(0), dim=0) * 50.0
        torch.testing.assert_close(head.weight[c], expected)


def test_head_classifies_matching_image_embeddings():
    model = OneHotText()
    head = zeroshot_head(model, model.tokenizer, NAMES, TEMPLATES)
    images = torch.eye(8)[:4] * torch.tensor([[0.2], [5.0], [1.0], [9.0]])  # any scale: the head normalises
    assert head(images).argmax(1).tolist() == [0, 1, 2, 3]
    logits = head(images)
    assert logits.max().item() <= 50.0 + 1e-4


def test_scale_defaults_to_100_without_logit_scale():
    model = OneHotText(logit_scale=None)
    head = zeroshot_head(model, model.tokenizer, NAMES[:2], TEMPLATES[:1])
    torch.testing.assert_close(head.weight.norm(dim=1), torch.full((2,), 100.0))


def test_tiny_clip_head_rows_are_unit_norm_times_exp_logit_scale(small_clip):
    model = small_clip()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(30.0))
    head = zeroshot_head(model, model.tokenizer, ("red", "blue", "green"), ("a {} object", "{} shapes"))
    assert head.weight.shape == (3, 16) and not head.weight.isnan().any()
    torch.testing.assert_close(head.weight.norm(dim=1), torch.full((3,), 30.0))
    assert not torch.allclose(head.weight[0], head.weight[1])


def test_heads_per_task_and_errors():
    model = OneHotText()
    heads = zeroshot_heads(model, model.tokenizer, {"pets": (NAMES[:2], TEMPLATES), "all": (NAMES, TEMPLATES[:1])})
    assert list(heads) == ["pets", "all"] and heads["pets"].num_classes == 2 and heads["all"].num_classes == 4
    torch.testing.assert_close(heads["pets"].weight, zeroshot_head(model, model.tokenizer, NAMES[:2], TEMPLATES).weight)
    with pytest.raises(TvqError, match="every template needs a '\\{\\}'"):
        zeroshot_head(model, model.tokenizer, NAMES, ("a {}", "a photo"))
    with pytest.raises(TvqError, match="at least one class name and one template"):
        zeroshot_head(model, model.tokenizer, (), TEMPLATES)
    with pytest.raises(TvqError, match="at least one class name and one template"):
        zeroshot_head(model, model.tokenizer, NAMES, ())
