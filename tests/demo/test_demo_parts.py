"""Parts of the demo pipeline: the λ-sweep shortcut, determinism of fine-tuning, the findings."""
from __future__ import annotations

import pytest
import torch

from _demo_helpers import isolated_cache

from tvq_lightning.demo.bench import prepare
from tvq_lightning.demo.config import MERGE_METHODS, SCHEMES, DemoConfig
from tvq_lightning.demo.finetune import build_joint_stores, finetune_task, task_sensitivities
from tvq_lightning.sweep.core import merged_models, scaled
from tvq_lightning.demo.report import findings
from tvq_lightning.errors import TvqError
from tvq_lightning.store.layout import StoreConfig
from tvq_lightning.store.reader import TaskVectorStore

TASKS = ("shapes", "digits")


@pytest.fixture(scope="module")
def bench_and_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    with isolated_cache(root):
        cfg = DemoConfig.quick(tasks=TASKS, train_size=128, val_size=16, test_size=16, finetune_steps=8,
                               schemes=("fp32", "tvq4", "rtvq_b3o2", "budget"))
        bench = prepare(cfg, root)
        stores = {s: root / "stores" / s for s in cfg.schemes}
        for t in TASKS:
            finetune_task(bench, t, stores)
        build_joint_stores(bench, stores)
    return bench, stores, root


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m, opt in MERGE_METHODS.items() if opt == "scaling"])
def test_scaling_sweep_equals_merging_at_each_value(bench_and_stores, method):
    """Every method swept over ``scaling`` is θ0 + scaling * delta: scaling the unit merge is exact."""
    bench, stores, _ = bench_and_stores
    store = TaskVectorStore(stores["tvq4"])
    unit = merged_models(store, bench.pretrained_path, bench.tasks, method, {"scaling": 1.0})
    for lam in (0.3, 0.7):
        direct = merged_models(store, bench.pretrained_path, bench.tasks, method, {"scaling": lam})(TASKS[0])
        fast = scaled(unit, bench.pretrained(), lam)(TASKS[0])
        for k, v in direct.items():
            torch.testing.assert_close(fast[k], v, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_finetuning_is_deterministic(bench_and_stores, tmp_path):
    bench, stores, _ = bench_and_stores
    again = {"fp32": tmp_path / "fp32"}
    finetune_task(bench, TASKS[0], again)
    a, b = TaskVectorStore(stores["fp32"]), TaskVectorStore(again["fp32"])
    for k in a.keys:
        assert torch.equal(a.task_vector(TASKS[0], k), b.task_vector(TASKS[0], k)), k


@pytest.mark.slow
def test_stores_hold_every_task_of_the_same_theta0(bench_and_stores):
    bench, stores, _ = bench_and_stores
    fps = set()
    for path in stores.values():
        st = TaskVectorStore(path)
        assert st.tasks == list(TASKS)
        st.check_pretrained(bench.pretrained())
        fps.add(st.fingerprint)
    assert len(fps) == 1


def _report(**over):
    cell = lambda v: {"avg": v, "per_task": {"a": v}}
    res = {"pretrained": {"fp32": cell(50.0)},
           "individual": {"fp32": cell(90.0), "tvq4": cell(89.8), "tvq3": cell(89.5), "tvq2": cell(85.0),
                          "rtvq_b3o2": cell(89.0)},
           "task_arithmetic": {"fp32": cell(70.0), "tvq4": cell(70.2), "tvq3": cell(69.5), "tvq2": cell(66.0),
                               "rtvq_b3o2": cell(69.0)},
           "tinting": {"fp32": cell(76.0)}, "adamerging_layer": {"fp32": cell(71.0)}}
    report = {"results": res, "storage": {"rtvq_b3o2": {"ratio_to_fp32": 0.075}},
              "diagnostics": {"tvq8": {"rel_l2_error": 0.01}, "tvq4": {"rel_l2_error": 0.1},
                              "tvq3": {"rel_l2_error": 0.2}, "tvq2": {"rel_l2_error": 0.5},
                              "fq4": {"rel_l2_error": 2.0}, "range_ratio": 20.0}}
    for path, value in over.items():
        node = report
        *parents, last = path.split("/")
        for p in parents:
            node = node[p]
        node[last] = value
    return {c["claim"]: c["holds"] for c in findings(report)}


@pytest.mark.slow
def test_budget_store_weighted_by_the_tasks_sensitivities(bench_and_stores):
    """The budget store's allocation used each quantized key's squared gradient, averaged over the
    tasks, and records them; the weights are those of the tasks' own losses at θ0."""
    bench, stores, _ = bench_and_stores
    weights = task_sensitivities(bench, SCHEMES["budget"])
    st = TaskVectorStore(stores["budget"])
    quantized = [k for k in st.keys if st.layout.keys[k].quantized]
    assert sorted(weights) == sorted(quantized) and all(w > 0 for w in weights.values())
    assert st.layout.allocation["sensitivity"] == pytest.approx(weights)
    with pytest.raises(TvqError, match="budget_sensitivity"):
        DemoConfig(budget_sensitivity="fisher")


def test_findings_follow_the_numbers():
    ok = _report()
    assert all(ok.values()), [c for c, h in ok.items() if not h]
    assert len(ok) == 16
    assert not _report(**{"results/individual/rtvq_b3o2": {"avg": 87.9, "per_task": {}}})[
        "|RTVQ B3O2 - FP32| <= 2 points (individual)"]
    assert not _report(**{"results/task_arithmetic/rtvq_b3o2": {"avg": 67.9, "per_task": {}}})[
        "|RTVQ B3O2 - FP32| <= 2 points (task_arithmetic)"]
    assert not _report(**{"results/individual/rtvq_b3o2": {"avg": 85.0, "per_task": {}}})[
        "RTVQ B3O2 > TVQ-INT2 (individual)"]
    assert not _report(**{"results/adamerging_layer/fp32": {"avg": 69.9, "per_task": {}}})[
        "layer-wise AdaMerging >= task arithmetic"]
    assert not _report(**{"results/tinting/fp32": {"avg": 74.9, "per_task": {}}})["Tinting++ >= task arithmetic + 5 points"]
    assert not _report(**{"diagnostics/fq4": {"rel_l2_error": 0.9}})["rel. L2 error FQ4 >= 10x TVQ4"]
    assert not _report(**{"diagnostics/range_ratio": 9.0})["range(θ) / range(τ) >= 10"]
    assert not _report(**{"storage/rtvq_b3o2": {"ratio_to_fp32": 0.081}})["RTVQ B3O2 <= 8 % of the fp32 bytes"]
    # task arithmetic recovers (70 - 50) / (90 - 50) = 50 % of the gap; 59 would be 22.5 %
    assert not _report(**{"results/task_arithmetic/fp32": {"avg": 59.0, "per_task": {}}})[
        "task arithmetic recovers >= 25 % of the pretrained -> individual gap"]


def test_quick_config_is_a_subset():
    q, full = DemoConfig.quick(), DemoConfig()
    assert set(q.tasks) < set(full.tasks)
    assert set(q.schemes) == set(full.schemes)      # the quick report still covers every store


def test_task_vector_cosine_of_a_known_store(tmp_path):
    """Two tasks whose vectors are (1, 0) and (1, 1) per key: cosine 1/sqrt(2)."""
    from tvq_lightning.demo.evaluate import task_vector_cosine
    from tvq_lightning.store import quantize_to_store

    pre = {"w": torch.zeros(2, 2), "v": torch.zeros(2)}
    fts = {"a": {"w": torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "v": torch.tensor([1.0, 0.0])},
           "b": {"w": torch.tensor([[1.0, 1.0], [0.0, 0.0]]), "v": torch.tensor([1.0, 1.0])}}
    quantize_to_store(pre, fts, tmp_path / "s", config=StoreConfig(scheme="fp32"), progress=False)
    st = TaskVectorStore(tmp_path / "s")
    assert task_vector_cosine(st, ["a", "b"], ["w", "v"]) == pytest.approx(2 ** -0.5)
    assert task_vector_cosine(st, ["a", "b"], ["w"]) == pytest.approx(2 ** -0.5)


def test_config_overrides_typed_and_checked():
    cfg = DemoConfig().with_overrides(["finetune_steps=150", "finetune_lr=1e-4", "budget_sensitivity=uniform",
                                       "tasks=shapes,digits", "scaling_grid=0.2,0.4"])
    assert (cfg.finetune_steps, cfg.finetune_lr, cfg.budget_sensitivity) == (150, 1e-4, "uniform")
    assert cfg.tasks == ("shapes", "digits") and cfg.scaling_grid == (0.2, 0.4)
    assert DemoConfig().with_overrides([]) == DemoConfig()
    for bad, match in (("finetune_steps", "KEY=VALUE"), ("no_such=1", "KEY=VALUE"), ("adapt_runs=x", "KEY=VALUE"),
                       ("finetune_steps=1.5", "not a valid int"), ("budget_sensitivity=fisher", "budget_sensitivity")):
        with pytest.raises(TvqError, match=match):
            DemoConfig().with_overrides([bad])


def test_cli_set_error_is_one_line(capsys):
    from tvq_lightning.cli.main import main

    assert main(["demo", "--quick", "--set", "nope=1", "--out", "unused"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope=1" in err[0]


def test_demo_runs_both_suites_by_default(monkeypatch, tmp_path):
    """`tvq demo` (what `make demo` runs) asks run_demo for suite "all": classification, then dense."""
    import functools
    from dataclasses import replace

    import tvq_lightning.demo as demo
    from tvq_lightning.demo.dense import DenseDemoConfig
    from tvq_lightning.cli.main import main

    seen = {}

    @functools.wraps(demo.run_demo)   # the options are read off run_demo's signature
    def record(out, **kw):
        seen.update(kw)
        return {}

    monkeypatch.setattr(demo, "run_demo", record)
    assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path / "o")]) == 0
    assert seen["suite"] == "all"
    assert seen["dense_cfg"] == DenseDemoConfig.quick()
    # the dense suite's settings: --dense_set, typed like --set
    assert main(["demo", "--dense_set", "finetune_batch=12", "tinting_steps=5", "--out", str(tmp_path / "o")]) == 0
    assert seen["dense_cfg"] == replace(DenseDemoConfig(), finetune_batch=12, tinting_steps=5)
    assert main(["demo", "--dense_set", "finetune_batch=1.5", "--out", str(tmp_path / "o")]) == 2
