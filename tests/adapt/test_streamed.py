"""The block-streamed merge: same outputs and gradients as one merge + functional_call, each unit
merged in forward, again in the recompute and once more in backward, the encoder left untouched."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from tvq_lightning.adapt import PackedTaskVectors, StreamedEncoder, base_tensors, find_units, merged_params
from tvq_lightning.errors import TvqError
from tvq_lightning.merging.methods.ties import TiesConfig

T = 3


def _images(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def _run(packed, enc, layer: bool, streamed: bool):
    shape = (len(packed.keys), T) if layer else (T,)
    coeffs = torch.rand(shape, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    if streamed:
        out = StreamedEncoder(enc, packed)(coeffs, _images())
    else:
        out = functional_call(enc, merged_params(packed, base_tensors(enc), coeffs), (_images(),))
    out.square().mean().backward()
    return out.detach(), coeffs.grad


@pytest.mark.parametrize("scheme,ties", [("tvq", None), ("rtvq", None), ("fp32", None), ("fq", None), ("tvq", True)])
@pytest.mark.parametrize("layer", [False, True])
def test_equals_one_merge_and_functional_call(stores, scheme, ties, layer):
    packed = PackedTaskVectors(stores.paths[scheme], stores.pre, ties=TiesConfig() if ties else None)
    enc = stores.encoder().requires_grad_(False)
    (o1, g1), (o2, g2) = (_run(packed, enc, layer, s) for s in (True, False))
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)
    assert bool(g1.ne(0).any())
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in enc.parameters())


def test_units_and_decode_counts(stores, monkeypatch):
    """Forward merges every key once; backward merges each unit's keys twice more (recompute and
    coefficient gradient) and the other keys once more; the encoder's forwards are restored."""
    packed = PackedTaskVectors(stores.paths["tvq"], stores.pre)
    enc = stores.encoder().requires_grad_(False)
    streamed = StreamedEncoder(enc, packed)
    assert find_units(enc) == ["blocks.0"] and list(streamed.units) == ["blocks.0"]
    unit_keys = {k for _, k in streamed.units["blocks.0"]}
    outer = {k for _, k in streamed.outer}
    assert unit_keys and outer and all(k.startswith("blocks.0.") for k in unit_keys)
    assert unit_keys | outer == {k for k in packed.keys if packed.has_vector(k)}
    calls = []
    orig = PackedTaskVectors.iter_task_vectors
    monkeypatch.setattr(PackedTaskVectors, "iter_task_vectors", lambda self, key, tasks=None: calls.append(key) or orig(self, key, tasks))
    coeffs = torch.full((T,), 0.3, requires_grad=True)
    out = streamed(coeffs, _images())
    assert sorted(calls) == sorted(unit_keys | outer)
    assert "forward" not in enc.blocks[0].__dict__
    calls.clear()
    out.sum().backward()
    assert sorted(calls) == sorted([*unit_keys, *unit_keys, *outer])
    with torch.no_grad():                                # no autograd: no checkpoint, one merge
        calls.clear()
        streamed(coeffs, _images())
        assert sorted(calls) == sorted(unit_keys | outer)


class _Stack(nn.Module):
    """A ModuleList of Linear layers; ``direct=True`` reads the last layer's weight itself."""

    def __init__(self, direct: bool):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.direct = direct

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = layer(x)
        last = self.layers[-1]
        return x @ last.weight.T + last.bias if self.direct else last(x)


@pytest.mark.parametrize("direct", [False, True])
def test_unit_read_directly_is_refused(tmp_path, direct):
    from tvq_lightning.store import StoreConfig, quantize_to_store

    torch.manual_seed(0)
    model = _Stack(direct).requires_grad_(False)
    pre = {k: v.clone() for k, v in model.state_dict().items()}
    fts = {t: {k: v + 0.01 * (i + 1) for k, v in pre.items()} for i, t in enumerate(["a", "b"])}
    quantize_to_store(pre, fts, tmp_path / "s", StoreConfig("fp32"), progress=False)
    streamed = StreamedEncoder(model, PackedTaskVectors(tmp_path / "s", pre))
    assert list(streamed.units) == ["layers.0", "layers.1", "layers.2"] and streamed.outer == []
    coeffs = torch.tensor([0.5, 1.0], requires_grad=True)
    x = torch.randn(2, 4)
    if direct:
        with pytest.raises(TvqError, match="'layers.2' holds merged weights but its forward never ran"):
            streamed(coeffs, x)
        assert all("forward" not in m.__dict__ for m in model.layers)     # restored after the error
        return
    merged = {k: v + 0.5 * 0.01 + 1.0 * 0.02 for k, v in pre.items()}
    torch.testing.assert_close(streamed(coeffs, x), functional_call(model, merged, (x,)))
