"""The block-streamed merge: same outputs and gradients as one merge + functional_call, each unit
merged in forward, again in the recompute and once more in backward, the encoder left untouched."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from tvq_lightning.adapt import (
    PackedTaskVectors,
    StreamedEncoder,
    base_tensors,
    find_units,
    merged_params,
)
from tvq_lightning.adapt.streamed import batch_dim, saved_as_parts
from tvq_lightning.errors import TvqError
from tvq_lightning.merging.methods.ties import TiesConfig

T = 3


def _images(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def _run(packed, enc, layer: bool, streamed: bool, chunk: int | None = None):
    shape = (len(packed.keys), T) if layer else (T,)
    coeffs = torch.rand(shape, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    if streamed:
        out = StreamedEncoder(enc, packed, chunk=chunk)(coeffs, _images())
    else:
        out = functional_call(enc, merged_params(packed, base_tensors(enc), coeffs), (_images(),))
    out.square().mean().backward()
    return out.detach(), coeffs.grad


@pytest.mark.parametrize("scheme,ties", [("tvq", None), ("rtvq", None), ("fp32", None), ("fq", None), ("tvq", True)])
@pytest.mark.parametrize("layer", [False, True])
@pytest.mark.parametrize("chunk", [None, 2])
def test_equals_one_merge_and_functional_call(stores, scheme, ties, layer, chunk):
    """Whole batch or slices of 2 of the 5 samples (the last one short): same outputs and gradients."""
    packed = PackedTaskVectors(stores.paths[scheme], stores.pre, ties=TiesConfig() if ties else None)
    enc = stores.encoder().requires_grad_(False)
    (o1, g1), (o2, g2) = (_run(packed, enc, layer, s, chunk) for s in (True, False))
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)
    assert bool(g1.ne(0).any())
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in enc.parameters())


@pytest.mark.parametrize("chunk", [None, 2])
def test_units_and_decode_counts(stores, monkeypatch, chunk):
    """Forward merges every key once; backward merges each unit's keys twice more (recompute and
    coefficient gradient) and the other keys once more; the encoder's forwards are restored. With
    slices of 2 the 5 samples go through the block as 2 + 2 + 1, in forward and in backward."""
    packed = PackedTaskVectors(stores.paths["tvq"], stores.pre)
    enc = stores.encoder().requires_grad_(False)
    sizes = []
    own = type(enc.blocks[0]).forward
    monkeypatch.setattr(type(enc.blocks[0]), "forward", lambda self, x, *a, **k: sizes.append(x.shape[0]) or own(self, x, *a, **k))
    streamed = StreamedEncoder(enc, packed, chunk=chunk)
    assert find_units(enc) == ["blocks.0"] and list(streamed.units) == ["blocks.0"]
    unit_keys = {k for _, k in streamed.units["blocks.0"]}
    outer = {k for _, k in streamed.outer}
    assert unit_keys and outer and all(k.startswith("blocks.0.") for k in unit_keys)
    assert unit_keys | outer == {k for k in packed.keys if packed.has_vector(k)}
    calls = []
    orig = PackedTaskVectors.iter_task_vectors
    monkeypatch.setattr(PackedTaskVectors, "iter_task_vectors", lambda self, key, tasks=None, readonly=False: calls.append(key) or orig(self, key, tasks, readonly))
    coeffs = torch.full((T,), 0.3, requires_grad=True)
    out = streamed(coeffs, _images())
    assert sorted(calls) == sorted(unit_keys | outer)
    assert "forward" not in enc.blocks[0].__dict__
    calls.clear()
    out.sum().backward()
    assert sorted(calls) == sorted([*unit_keys, *unit_keys, *outer])
    assert sizes == ([5, 5] if chunk is None else [2, 2, 1] * 2)
    with torch.no_grad():                                # no autograd: no checkpoint, one merge
        calls.clear()
        streamed(coeffs, _images())
        assert sorted(calls) == sorted(unit_keys | outer)


def test_batch_dim():
    x = torch.zeros(4, 6, 8)
    assert batch_dim(x, 4, None) == 0 and batch_dim(x, 6, None) == 1 and batch_dim(x, 5, True) is None
    y = torch.zeros(6, 6, 8)                       # sequence length == batch size: only a flag decides
    assert batch_dim(y, 6, None) is None and batch_dim(y, 6, True) == 0 and batch_dim(y, 6, False) == 1


class _SeqBlock(nn.Module):
    """A sequence-first ``(L, N, D)`` block that mixes the tokens of each sample (as attention does)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + torch.tanh(self.fc(x)) * x.mean(0, keepdim=True)


class _SeqFirst(nn.Module):
    """A token encoder with sequence-first blocks (as older open_clip versions have)."""

    def __init__(self, flag: bool):
        super().__init__()
        self.blocks = nn.ModuleList(_SeqBlock() for _ in range(2))
        if flag:
            self.batch_first = False

    def forward(self, x):                          # x: (N, L, D)
        x = x.transpose(0, 1)
        for blk in self.blocks:
            x = blk(x)
        return x.mean(0)


@pytest.mark.parametrize("n,flag,sliced", [(3, False, True), (4, True, True), (4, False, False)])
def test_sequence_first_blocks(tmp_path, monkeypatch, n, flag, sliced):
    """Sequence-first blocks are sliced along dimension 1; with L == N only a batch_first flag (here
    on the encoder) tells the dimensions apart, else the block runs whole."""
    from tvq_lightning.store import StoreConfig, quantize_to_store

    torch.manual_seed(0)
    model = _SeqFirst(flag).requires_grad_(False)
    pre = {k: v.clone() for k, v in model.state_dict().items()}
    fts = {t: {k: v + 0.05 * torch.randn_like(v) for k, v in pre.items()} for t in ["a", "b"]}
    quantize_to_store(pre, fts, tmp_path / "s", StoreConfig("tvq", bits=4), progress=False)
    packed = PackedTaskVectors(tmp_path / "s", pre)
    x = torch.randn(n, 4, 8)
    sizes = []
    monkeypatch.setattr(_SeqBlock, "forward", lambda self, x, own=_SeqBlock.forward: sizes.append(x.shape[1]) or own(self, x))
    coeffs = torch.tensor([0.4, 0.7], requires_grad=True)
    out = StreamedEncoder(model, packed, chunk=1)(coeffs, x)
    out.square().sum().backward()
    assert sizes == ([1] * n * 4 if sliced else [n] * 4)
    ref_c = coeffs.detach().clone().requires_grad_(True)
    ref = functional_call(model, merged_params(packed, base_tensors(model), ref_c), (x,))
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(coeffs.grad, ref_c.grad, rtol=1e-5, atol=1e-6)


def test_saved_as_parts_keeps_the_parts_not_their_copy(stores):
    """The concatenated batch is not kept for backward (the parts are); gradients are unchanged, and a
    part modified in place before backward is refused."""
    import weakref

    packed = PackedTaskVectors(stores.paths["tvq"], stores.pre)
    enc = stores.encoder().requires_grad_(False)
    parts = list(_images(6).split([2, 4]))
    ref_out, ref_grad = _run(packed, enc, False, True, 2)
    coeffs = torch.rand((T,), generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    whole = torch.cat(parts)
    gone = weakref.ref(whole)
    with saved_as_parts(whole, parts):
        out = StreamedEncoder(enc, packed, chunk=2)(coeffs, whole)
    del whole
    assert gone() is None
    out[:5].square().mean().backward()         # _run's loss is on _images(5) = the first 5 of _images(6)
    torch.testing.assert_close(out[:5].detach(), ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(coeffs.grad, ref_grad, rtol=1e-5, atol=1e-6)
    whole = torch.cat(parts)
    with saved_as_parts(whole, parts):
        out = StreamedEncoder(enc, packed, chunk=2)(coeffs, whole)
    parts[1].add_(1.0)
    with pytest.raises(TvqError, match="modified in place"):
        out.sum().backward()



class _LinearBlocks(nn.Module):
    """Blocks that start with a Linear: under bf16 autocast each passes bf16 activations to the next."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x


@pytest.mark.parametrize("chunk", [None, 2])
def test_bf16_autocast_reaches_the_recompute_in_backward(tmp_path, chunk):
    """Under bf16 autocast a unit recomputed in backward runs under the forward's autocast too (it
    used to get the saved bf16 input with fp32 weights and fail): the same outputs and coefficient
    gradients as one merge + functional_call under the same autocast."""
    from tvq_lightning.store import StoreConfig, quantize_to_store

    torch.manual_seed(0)
    model = _LinearBlocks().requires_grad_(False)
    pre = {k: v.clone() for k, v in model.state_dict().items()}
    fts = {t: {k: v + 0.05 * torch.randn_like(v) for k, v in pre.items()} for t in ["a", "b"]}
    quantize_to_store(pre, fts, tmp_path / "s", StoreConfig("tvq", bits=4), progress=False)
    packed = PackedTaskVectors(tmp_path / "s", pre)
    x = torch.randn(5, 8)
    outs, grads = [], []
    for streamed in (True, False):
        coeffs = torch.tensor([0.4, 0.7], requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if streamed:
                out = StreamedEncoder(model, packed, chunk=chunk)(coeffs, x)
            else:
                out = functional_call(model, merged_params(packed, base_tensors(model), coeffs), (x,))
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        outs.append(out.detach().float())
        grads.append(coeffs.grad)
    torch.testing.assert_close(outs[0], outs[1])
    assert bool(grads[0].ne(0).all())
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-2, atol=1e-3)
