"""The custom merge Function: gradients equal dense autograd's, nothing saved, decoded twice."""
from __future__ import annotations

import pytest
import torch

from tvq_lightning.adapt import MergeKey, PackedTaskVectors, base_tensors, merged_params
from tvq_lightning.errors import TvqError
from tvq_lightning.merging import merge_state_dict
from tvq_lightning.store import TaskVectorStore

T = 3


def _dense(st: TaskVectorStore, pre, coeffs: torch.Tensor, base) -> dict[str, torch.Tensor]:
    """theta0 + sum_t lam_t tau_t with plain autograd over dense float32 task vectors."""
    out = {}
    for i, key in enumerate(st.keys):
        taus = st.task_vectors(key, None, pre[key])
        if not any(bool(t.ne(0).any()) for t in taus):
            continue
        lam = coeffs[i] if coeffs.dim() == 2 else coeffs
        theta = base[key]
        for t, tau in enumerate(taus):
            theta = theta + lam[t] * tau
        out[key] = theta
    return out


@pytest.mark.parametrize("scheme", ["fp32", "tvq", "rtvq", "fq"])
@pytest.mark.parametrize("layer", [False, True])
def test_gradients_equal_dense_autograd(stores, scheme, layer):
    """(a) forward values and d/dlambda, d/dtheta0 equal autograd on a dense implementation."""
    st = TaskVectorStore(stores.paths[scheme])
    packed = PackedTaskVectors(st, stores.pre)
    g = torch.Generator().manual_seed(1)
    shape = (len(st.keys), T) if layer else (T,)
    init = torch.rand(shape, generator=g)
    grads = {k: torch.randn(st.layout.keys[k].shape, generator=g) for k in st.keys}
    results = []
    for build in ("packed", "dense"):
        coeffs = init.clone().requires_grad_(True)
        base = {k: v.clone().requires_grad_(True) for k, v in stores.pre.items()}
        params = merged_params(packed, base, coeffs) if build == "packed" else _dense(st, stores.pre, coeffs, base)
        loss = sum((params[k] * grads[k]).sum() for k in params)
        loss.backward()
        results.append((params, coeffs.grad, {k: base[k].grad for k in params}))
    (p1, c1, b1), (p2, c2, b2) = results
    assert p1.keys() == p2.keys()
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b1[k], b2[k], rtol=0, atol=0)
    torch.testing.assert_close(c1, c2, rtol=1e-5, atol=1e-6)


def test_gradient_matches_finite_differences(stores):
    packed = PackedTaskVectors(stores.paths["tvq"], stores.pre)
    key = "blocks.0.self_attn.in_proj_weight"
    theta0 = stores.pre[key]
    g = torch.randn(theta0.shape, generator=torch.Generator().manual_seed(2))
    lam = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float32, requires_grad=True)
    (MergeKey.apply(lam, theta0, packed, key) * g).sum().backward()
    h = 0.05
    for t in range(T):
        e = torch.zeros(T)
        e[t] = h
        with torch.no_grad():
            up = (MergeKey.apply(lam + e, theta0, packed, key).double() * g).sum()
            down = (MergeKey.apply(lam - e, theta0, packed, key).double() * g).sum()
        assert float(lam.grad[t]) == pytest.approx(float((up - down) / (2 * h)), rel=2e-3, abs=1e-4)


def test_merge_saves_no_tensors_and_decodes_twice(stores, monkeypatch):
    """Memory: autograd keeps no task vector; each key is decoded in forward and again in backward."""
    st = TaskVectorStore(stores.paths["tvq"])
    packed = PackedTaskVectors(st, stores.pre)
    calls = []
    orig = PackedTaskVectors.iter_task_vectors

    def counting(self, key, tasks=None, readonly=False):
        calls.append(key)
        return orig(self, key, tasks, readonly)

    monkeypatch.setattr(PackedTaskVectors, "iter_task_vectors", counting)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    coeffs = torch.full((T,), 0.3, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        params = merged_params(packed, base_tensors(stores.encoder()), coeffs)
    assert sum(saved) == 0
    assert sorted(calls) == sorted(params)                # forward: once per key
    sum(p.sum() for p in params.values()).backward()
    assert sorted(calls) == sorted(list(params) * 2)      # backward: once more per key
    saved.clear()                                         # the dense merge would keep T copies alive
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _dense(st, stores.pre, coeffs, stores.pre)
    assert sum(saved) >= 4 * T * sum(stores.pre[k].numel() for k in params) * 0.9


def test_taskwise_equals_task_arithmetic_and_layerwise(stores):
    packed = PackedTaskVectors(stores.paths["rtvq"], stores.pre)
    base = base_tensors(stores.encoder())
    with torch.no_grad():
        task = merged_params(packed, base, torch.full((T,), 0.3))
        layer = merged_params(packed, base, torch.full((len(packed.keys), T), 0.3))
    ta = merge_state_dict(stores.paths["rtvq"], stores.pre, "task_arithmetic", scaling=0.3)
    for k in task:
        assert torch.equal(task[k], layer[k])
        torch.testing.assert_close(task[k], ta[k], rtol=0, atol=2e-7)


def test_functional_call_gradients_reach_only_coefficients(stores):
    enc = stores.encoder().requires_grad_(False)
    packed = PackedTaskVectors(stores.paths["tvq"], stores.pre)
    coeffs = torch.full((len(packed.keys), T), 0.3, requires_grad=True)
    params = merged_params(packed, base_tensors(enc), coeffs)
    out = torch.func.functional_call(enc, params, (torch.randn(4, 3, 32, 32),))
    out.square().mean().backward()
    assert coeffs.grad is not None and bool(coeffs.grad.ne(0).any())
    assert all(p.grad is None for p in enc.parameters())


def test_wrong_coefficient_shape(stores):
    packed = PackedTaskVectors(stores.paths["tvq"], stores.pre)
    with pytest.raises(TvqError, match="fit neither task-wise"):
        merged_params(packed, stores.pre, torch.zeros(T + 1))
    with pytest.raises(TvqError, match="has no parameter or buffer"):
        merged_params(packed, {}, torch.zeros(T))
