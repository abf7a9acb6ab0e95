"""Every registered merging method against a naive whole-model reference, plus defining properties.

The references below are written plainly from docs/algorithms.md §4: every floating key of the store
is flattened into one vector per task (the store's dequantized task vectors), the formula is
applied to the full vectors (TIES with ``kthvalue``), and the result is compared with the
streaming engine's output on fp32, TVQ-INT4 and RTVQ stores.
"""
from __future__ import annotations

import hashlib
import math
import re

import pytest
import torch

from tvq_lightning.errors import TvqError
from tvq_lightning.merging.base import KeyInput, PerTaskDelta, stack_sum
from tvq_lightning.merging.engine import iter_merged, merge_state_dict, plan_merge, run_passes
from tvq_lightning.merging.registry import config_fields, create_merger, list_mergers
from tvq_lightning.store import StoreConfig, TaskVectorStore, quantize_to_store
from tvq_lightning.testing import synthetic_finetunes, tiny_pretrained

TASKS = ["t0", "t1", "t2"]  # the tasks of the conftest stores


# --------------------------------------------------------------------------------------------
# naive references over the whole flattened model
# --------------------------------------------------------------------------------------------
class Flat:
    """The store's task vectors, one flat vector per task, with each key's slice."""

    def __init__(self, store_path, pre, tasks=TASKS):
        st = TaskVectorStore(store_path)
        self.keys = list(st.keys)
        self.tasks = list(tasks)
        self.slices, o = {}, 0
        for k in self.keys:
            self.slices[k] = slice(o, o + pre[k].numel())
            o += pre[k].numel()
        self.taus = [torch.cat([st.task_vector(t, k, pre[k]).reshape(-1) for k in self.keys]) for t in self.tasks]
        st.close()
        blocks = {k: int(m.group(1)) for k in self.keys if (m := re.match(r"blocks\.(\d+)\.", k))}
        self.block = blocks
        self.depth = len(set(blocks.values()))

    def model(self, pre, delta):
        """theta_0 + delta on the store's keys, theta_0 elsewhere."""
        return {k: (pre[k] + delta[self.slices[k]].reshape(pre[k].shape)) if k in self.slices else pre[k] for k in pre}


def seq_sum(vs):
    out = vs[0].clone()
    for v in vs[1:]:
        out = out + v
    return out


def naive_ties(f, taus, scaling=0.3, k=0.2, merge="dis-sum"):
    trimmed = []
    for tau in taus:
        d = tau.numel()
        v = tau.abs().kthvalue(d - math.floor(k * d)).values if k < 1 else torch.tensor(0.0)
        trimmed.append(torch.where(tau.abs() >= v, tau, torch.zeros_like(tau)))
    gamma = torch.sign(seq_sum(trimmed))
    gamma[gamma == 0] = torch.sign(gamma.sum())
    kept = [(torch.sign(t) == gamma) & (t != 0) for t in trimmed]
    out = seq_sum([torch.where(m, t, torch.zeros_like(t)) for m, t in zip(kept, trimmed)])
    if merge == "dis-mean":
        out = out / seq_sum([m.float() for m in kept]).clamp(min=1.0)
    return scaling * out


def naive_emr(f):
    gamma = torch.where(seq_sum(f.taus) > 0, 1.0, -1.0)
    masks = [(t * gamma) > 0 for t in f.taus]
    uni = torch.stack([torch.where(m, t.abs(), torch.zeros_like(t)) for m, t in zip(masks, f.taus)]).amax(0)
    shared = gamma * uni
    scales = []
    for t, m in zip(f.taus, masks):
        num = sum(float(t[s].abs().mean()) for s in f.slices.values())
        den = sum(float((m[s] * shared[s]).abs().mean()) for s in f.slices.values())
        scales.append(num / den)
    return [sc * (m * shared) for sc, m in zip(scales, masks)]


def naive_tall_masks(f, lambdas):
    lambdas = lambdas if isinstance(lambdas, (list, tuple)) else [lambdas] * len(f.taus)
    mtl = seq_sum(f.taus)
    return mtl, [t.abs() > (mtl - t).abs() * lam for t, lam in zip(f.taus, lambdas)]


def naive_tall(f, lambdas=0.4, scaling=1.0):
    mtl, masks = naive_tall_masks(f, lambdas)
    return [scaling * (m * mtl) for m in masks]


def naive_consensus(f, k=2, lambdas=0.4, scaling=0.3):
    mtl, masks = naive_tall_masks(f, lambdas)
    count = seq_sum([m.int() for m in masks])
    return scaling * torch.where(count >= k, mtl, torch.zeros_like(mtl))


def naive_lines(f, base="task_arithmetic", alpha=None, beta=0.5, ties_k=0.2, ties_merge="dis-sum"):
    merged = seq_sum(f.taus) if base == "task_arithmetic" else naive_ties(f, f.taus, 1.0, ties_k, ties_merge)
    if alpha is None:
        alpha = float(seq_sum(f.taus).abs().sum()) / float(merged.abs().sum()) / len(f.taus)
    out = merged.clone()
    for key, s in f.slices.items():
        ell = f.block.get(key)
        out[s] *= alpha if ell is None else alpha + beta * ell / (f.depth - 1)
    return out


def naive_magmax(f, scaling=0.5):
    stack = torch.stack(f.taus)
    idx = stack.abs().argmax(0, keepdim=True)       # the first maximum: ties -> lowest task index
    return scaling * stack.gather(0, idx)[0]


def naive_breadcrumbs(f, beta=0.006, gamma=0.85, scaling=0.2):
    kept = []
    for tau in f.taus:
        keep = torch.zeros_like(tau, dtype=torch.bool)
        for s in f.slices.values():
            a = tau[s].abs()
            n = a.numel()
            rank = torch.argsort(torch.argsort(a, stable=True), stable=True)
            keep[s] = (rank >= math.floor(gamma * n)) & (rank < n - math.floor(beta * n))
        kept.append(torch.where(keep, tau, torch.zeros_like(tau)))
    return scaling * seq_sum(kept)


def dare_seed(seed, key, task):
    return int.from_bytes(hashlib.sha256(f"dare\x00{seed}\x00{key}\x00{task}".encode()).digest()[:8], "little") & (2**63 - 1)


def naive_dare(f, p=0.5, scaling=0.3, seed=0, rescale=True, base="task_arithmetic", ties_k=0.2, ties_merge="dis-sum"):
    dropped = []
    for task, tau in zip(f.tasks, f.taus):
        keep = torch.zeros_like(tau, dtype=torch.bool)
        for key, s in f.slices.items():
            g = torch.Generator().manual_seed(dare_seed(seed, key, task))
            keep[s] = torch.rand(s.stop - s.start, generator=g) >= p
        t = torch.where(keep, tau, torch.zeros_like(tau))
        dropped.append(t / (1 - p) if rescale and p > 0 else t)
    if base == "ties":
        return naive_ties(f, dropped, scaling, ties_k, ties_merge)
    return scaling * seq_sum(dropped)


NAIVE = {
    "weight_averaging": lambda f: seq_sum(f.taus) / len(f.taus),
    "task_arithmetic": lambda f, scaling=0.3: scaling * seq_sum(f.taus),
    "ties": lambda f, **o: naive_ties(f, f.taus, **o),
    "emr": naive_emr,
    "tall": naive_tall,
    "consensus": naive_consensus,
    "lines": naive_lines,
    "magmax": naive_magmax,
    "breadcrumbs": naive_breadcrumbs,
    "dare": naive_dare,
}


# --------------------------------------------------------------------------------------------
# engine side
# --------------------------------------------------------------------------------------------
def per_task_models(store, pre, method, tasks=None, **opts):
    """Task t's model theta_0 + scales[t] * masks[t] * shared, for every task, from the engine."""
    plan = plan_merge(store, pre, method, tasks=tasks, **opts)
    items = list(iter_merged(plan))
    scales = plan.merger.finalize()["scales"]
    models = [{} for _ in plan.tasks]
    for key, merged, p in items:
        for t, m in enumerate(models):
            if isinstance(merged, PerTaskDelta):
                m[key] = p + scales[t] * (merged.masks[t] * merged.shared)
            else:
                m[key] = merged
    return models


def assert_models_close(got, expected, pre):
    assert list(got) == list(pre) or set(got) == set(pre)
    for k in pre:
        assert got[k].dtype == pre[k].dtype, k
        if not pre[k].is_floating_point():
            assert torch.equal(got[k], pre[k]), f"integer buffer {k} must be theta_0's"
        else:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def check_against_naive(setup, scheme, method, opts):
    pre, store = setup.pre, setup.stores[scheme]
    assert method in NAIVE, f"no naive reference for merging method {method!r}: add one to NAIVE"
    f = Flat(store, pre)
    expected = NAIVE[method](f, **opts)
    if create_merger(method, **opts).per_task:
        for got, delta in zip(per_task_models(store, pre, method, **opts), expected, strict=True):
            assert_models_close(got, f.model(pre, delta), pre)
    else:
        assert_models_close(merge_state_dict(store, pre, method, **opts), f.model(pre, expected), pre)


@pytest.mark.parametrize("scheme", ["fp32", "tvq"])
@pytest.mark.parametrize("method", list_mergers())
def test_every_method_matches_naive(setup, method, scheme):
    check_against_naive(setup, scheme, method, {})


VARIANTS = [
    ("task_arithmetic", {"scaling": 0.7}),
    ("ties", {"merge": "dis-mean"}),
    ("ties", {"k": 0.5, "scaling": 0.8}),
    ("tall", {"lambdas": [0.2, 0.4, 0.6], "scaling": 0.8}),
    ("consensus", {"k": 1, "lambdas": 0.3}),
    ("consensus", {"k": 3.0}),
    ("lines", {"base": "ties"}),
    ("lines", {"base": "ties", "ties_merge": "dis-mean", "alpha": 0.2, "beta": 0.3}),
    ("lines", {"alpha": 0.1, "beta": 1.0}),
    ("magmax", {"scaling": 1.0}),
    ("breadcrumbs", {"beta": 0.1, "gamma": 0.5, "scaling": 0.4}),
    ("dare", {"p": 0.3, "rescale": False, "seed": 3}),
    ("dare", {"base": "ties", "scaling": 0.5}),
]


@pytest.mark.parametrize("scheme", ["fp32", "tvq"])
@pytest.mark.parametrize("method,opts", VARIANTS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(VARIANTS)])
def test_variants_match_naive(setup, method, opts, scheme):
    check_against_naive(setup, scheme, method, opts)


@pytest.mark.parametrize("method,opts", [("ties", {}), ("emr", {}), ("lines", {"base": "ties"}), ("consensus", {}),
                                         ("dare", {"base": "ties"})])
def test_rtvq_matches_naive(setup, method, opts):
    check_against_naive(setup, "rtvq", method, opts)


CRAFTED = [(m, {}) for m in list_mergers()] + [
    ("tall", {"lambdas": 0.5}),
    ("consensus", {"lambdas": 0.5, "k": 2}),
    ("ties", {"k": 0.5}),
    ("ties", {"k": 0.5, "merge": "dis-mean"}),
    ("lines", {"base": "ties", "ties_k": 0.5}),
    ("lines", {"base": "ties", "ties_k": 0.5, "ties_merge": "dis-mean"}),  # ambiguous entries change the L1 norm
    ("dare", {"base": "ties", "ties_k": 0.5, "p": 0.2}),
    ("breadcrumbs", {"beta": 0.1, "gamma": 0.3}),
]


@pytest.mark.parametrize("method,opts", CRAFTED, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CRAFTED)])
def test_ties_and_cancellations_match_naive(crafted, method, opts):
    """Exact ties and exactly-zero sums (integer task vectors) follow the spec's tie rules."""
    f = Flat(crafted.stores["fp32"], crafted.pre)
    stack = torch.stack(f.taus)
    assert (stack.sum(0) == 0).sum() > 20 and (stack.abs() == 2).sum() > 20  # the cases are there
    check_against_naive(crafted, "fp32", method, opts)


# --------------------------------------------------------------------------------------------
# defining properties
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [m for m in list_mergers() if "scaling" in {f.name for f in config_fields(m)}])
def test_zero_scaling_gives_pretrained(setup, method):
    pre = setup.pre
    if create_merger(method).per_task:
        models = per_task_models(setup.stores["tvq"], pre, method, scaling=0.0)
    else:
        models = [merge_state_dict(setup.stores["tvq"], pre, method, scaling=0.0)]
    for m in models:
        for k in pre:
            assert torch.equal(m[k], pre[k]), k


def test_lines_zero_gives_pretrained(setup):
    out = merge_state_dict(setup.stores["fp32"], setup.pre, "lines", alpha=0.0, beta=0.0)
    assert all(torch.equal(out[k], setup.pre[k]) for k in setup.pre)


def test_task_arithmetic_one_task_is_finetuned(setup):
    out = merge_state_dict(setup.stores["fp32"], setup.pre, "task_arithmetic", tasks=["t1"], scaling=1.0)
    for k, v in setup.pre.items():
        if v.is_floating_point():
            torch.testing.assert_close(out[k], setup.fts["t1"][k], rtol=0, atol=1e-6)
        else:
            assert torch.equal(out[k], v)  # integer buffers are theta_0's, not the fine-tune's


@pytest.mark.parametrize("scheme", ["fp32", "tvq"])
def test_ties_keeps_exactly_the_top_entries(setup, scheme):
    store, pre = setup.stores[scheme], setup.pre
    f = Flat(store, pre)
    plan = plan_merge(store, pre, "ties")
    run_passes(plan)
    for t, (tau, v) in enumerate(zip(f.taus, plan.merger.thresholds)):
        d = tau.numel()
        a = tau.abs()
        assert v == float(a.kthvalue(d - math.floor(0.2 * d)).values)
        kept = int((a >= v).sum())
        assert int((a > v).sum()) <= math.floor(0.2 * d) < kept
        if a.unique().numel() == d:  # no ties at the threshold: exactly floor(0.2 d) + 1
            assert kept == math.floor(0.2 * d) + 1
        # one task alone: TIES is its trimmed vector, so the entries that move are the kept ones
        single = plan_merge(store, pre, "ties", tasks=[TASKS[t]], scaling=1.0)
        run_passes(single)
        moved = sum(int((single.merger.merge_key(single.key_input(k)) != 0).sum()) for k in single.store.keys)
        assert moved == int(((a >= v) & (tau != 0)).sum())


def test_emr_reconstructs_sign_consistent_entries(setup):
    pre, store = setup.pre, setup.stores["fp32"]
    f = Flat(store, pre)
    plan = plan_merge(store, pre, "emr")
    deltas = {k: d for k, d, _ in iter_merged(plan) if isinstance(d, PerTaskDelta)}
    scales = plan.merger.finalize()["scales"]
    assert all(s > 0 for s in scales)
    shared = torch.cat([deltas[k].shared.reshape(-1) for k in f.keys])
    stack = torch.stack(f.taus)
    agree = (stack > 0).all(0) | (stack < 0).all(0)
    assert agree.sum() > 100
    torch.testing.assert_close(shared[agree].abs(), stack.abs().amax(0)[agree], rtol=0, atol=0)
    for t, tau in enumerate(f.taus):
        mask = torch.cat([deltas[k].masks[t].reshape(-1) for k in f.keys])
        assert mask[agree].all()
        rebuilt = scales[t] * mask * shared
        assert torch.equal(torch.sign(rebuilt[agree]), torch.sign(tau[agree]))


def test_lines_scales_deeper_blocks_more(setup):
    plan = plan_merge(setup.stores["fp32"], setup.pre, "lines", beta=0.6)
    T, L = len(TASKS), plan.depth
    assert L == 2
    seen = {}
    for key in plan.store.keys:
        inp = plan.key_input(key)
        total = stack_sum(inp.taus)
        out = plan.merger.merge_key(inp)
        scale = 1 / T if inp.block is None else 1 / T + 0.6 * inp.block / (L - 1)
        torch.testing.assert_close(out, total * scale, rtol=1e-6, atol=0)
        seen[inp.block] = scale
    assert seen[None] < seen[0] + 1e-12 < seen[1]  # outside blocks: alpha; block 0: alpha; block 1: alpha + beta


def test_lines_single_block_model(tmp_path):
    """L = 1: no division by zero, every key gets alpha."""
    pre = dict(tiny_pretrained(0, width=16, depth=1).state_dict())
    fts = synthetic_finetunes(pre, 2, seed=2)
    quantize_to_store(pre, {"a": fts[0], "b": fts[1]}, tmp_path / "s", StoreConfig("fp32"), progress=False)
    plan = plan_merge(tmp_path / "s", pre, "lines", beta=0.7)
    assert plan.depth == 1
    for key in plan.store.keys:
        inp = plan.key_input(key)
        torch.testing.assert_close(plan.merger.merge_key(inp), stack_sum(inp.taus) * 0.5, rtol=1e-6, atol=0)
    m = create_merger("lines", alpha=0.3, beta=0.7)
    x = torch.ones(4)
    assert torch.equal(m.merge_key(KeyInput("blocks.0.w", x, [x.clone()], ["a"], block=0, num_blocks=1)), x * 0.3)


def test_dare_is_seeded(setup):
    store, pre = setup.stores["tvq"], setup.pre
    a = merge_state_dict(store, pre, "dare", seed=5)
    b = merge_state_dict(store, pre, "dare", seed=5)
    c = merge_state_dict(store, pre, "dare", seed=6)
    assert all(torch.equal(a[k], b[k]) for k in pre)
    assert any(not torch.equal(a[k], c[k]) for k in pre if pre[k].is_floating_point())


def test_dare_masks_ignore_key_order_and_task_subset(setup):
    store, pre = setup.stores["fp32"], setup.pre
    plan = plan_merge(store, pre, "dare", p=0.5, scaling=1.0)
    keys = list(plan.store.keys)
    fwd = {k: plan.merger.merge_key(plan.key_input(k)) for k in keys}
    rev = {k: plan.merger.merge_key(plan.key_input(k)) for k in reversed(keys)}
    assert all(torch.equal(fwd[k], rev[k]) for k in keys)
    one = plan_merge(store, pre, "dare", tasks=["t1"], p=0.5, scaling=1.0)
    zeros = total = 0
    for k in keys:
        inp_all, inp_one = plan.key_input(k), one.key_input(k)
        tau = inp_one.taus[0].clone()
        plan.merger.drop(inp_all)
        out = one.merger.merge_key(inp_one)
        assert torch.equal(out, inp_all.taus[1])              # t1's mask does not depend on the other tasks
        assert torch.all((out == 0) | (out == tau / 0.5))     # dropped, or rescaled by 1/(1-p)
        zeros += int((out == 0).sum())
        total += out.numel()
    assert abs(zeros / total - 0.5) < 0.02


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------
def test_unknown_method_names_close_matches():
    with pytest.raises(TvqError, match="nope"):
        create_merger("nope")
    with pytest.raises(TvqError, match="did you mean 'ties'"):
        create_merger("tie")
    with pytest.raises(TvqError, match="did you mean 'magmax'"):
        create_merger("magmx")


def test_unknown_option_lists_options(setup):
    with pytest.raises(TvqError, match=r"no option 'lamda'.*scaling"):
        create_merger("ties", lamda=0.3)
    with pytest.raises(TvqError, match=r"no option 'p'.*beta, gamma, scaling"):
        merge_state_dict(setup.stores["fp32"], setup.pre, "breadcrumbs", p=0.1)


@pytest.mark.parametrize("method,opts,pattern", [
    ("dare", {"p": 1.0}, "p=1.0"),
    ("dare", {"base": "sum"}, "base"),
    ("lines", {"base": "dare"}, "base"),
    ("lines", {"ties_k": 0.0}, "k=0.0"),
    ("breadcrumbs", {"beta": 0.5, "gamma": 0.6}, "beta \\+ gamma"),
    ("breadcrumbs", {"gamma": -0.1}, "gamma"),
    ("consensus", {"k": -1}, "k=-1"),
    ("consensus", {"k": 1.5}, "k=1.5"),
    ("tall", {"lambdas": "big"}, "lambdas"),
    ("tall", {"lambdas": [0.3, -1.0]}, "lambdas"),
])
def test_bad_options(method, opts, pattern):
    with pytest.raises(TvqError, match=pattern):
        create_merger(method, **opts)


def test_wrong_number_of_lambdas(setup):
    with pytest.raises(TvqError, match="2 values but 3 tasks"):
        per_task_models(setup.stores["fp32"], setup.pre, "tall", lambdas=[0.2, 0.3])


def test_per_task_method_is_not_a_single_model(setup):
    with pytest.raises(TvqError, match="one model per task"):
        merge_state_dict(setup.stores["fp32"], setup.pre, "emr")
