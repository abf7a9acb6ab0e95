"""``tvq demo --quick`` end to end: the report's schema, its storage figures and its files."""
from __future__ import annotations

import json

import pytest
from _demo_helpers import isolated_cache

from tvq_lightning.cli.main import main
from tvq_lightning.demo.config import MERGE_METHODS, SCHEMES, DemoConfig
from tvq_lightning.demo.report import METHOD_ORDER

ADAPTIVE = ("adamerging_task", "adamerging_layer", "tinting")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out = root / "out"
    with isolated_cache(root):
        assert main(["demo", "--quick", "--suite", "classification", "--no-progress", "--out", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text())


def _cell(cell: dict, tasks: list[str]) -> None:
    assert set(cell["per_task"]) == set(tasks)
    assert all(0.0 <= v <= 100.0 for v in cell["per_task"].values())
    assert cell["avg"] == pytest.approx(sum(cell["per_task"].values()) / len(tasks))


@pytest.mark.slow
def test_report_schema(quick_demo):
    _, report = quick_demo
    tasks = report["tasks"]
    assert tasks == ["shapes", "colours", "digits"]
    res = report["results"]
    assert set(res) <= set(METHOD_ORDER)
    assert set(res["pretrained"]) == {"fp32"}
    full = DemoConfig.quick().all_methods_schemes
    for method in ("individual", "task_arithmetic"):
        assert set(res[method]) == set(SCHEMES), method
    for method in MERGE_METHODS:
        assert set(res[method]) >= set(full), method
    for method in ADAPTIVE:
        assert set(res[method]) == {s for m, s in DemoConfig.quick().adapt_runs if m == method}, method
    for method, row in res.items():
        for cell in row.values():
            _cell(cell, tasks)
    # lambda chosen on validation, from the grid
    assert res["task_arithmetic"]["fp32"]["value"] in DemoConfig.quick().scaling_grid
    assert set(report["timings"]) >= {"setup", "finetune", "stores", "merge", "adapt", "report", "total"}
    assert report["timings"]["total"] >= sum(v for k, v in report["timings"].items() if k != "total") - 1e-6


@pytest.mark.slow
def test_storage_and_diagnostics(quick_demo):
    _, report = quick_demo
    sto, diag = report["storage"], report["diagnostics"]
    assert set(sto) == set(SCHEMES)
    ratio = {s: sto[s]["ratio_to_fp32"] for s in sto}
    assert ratio["fp32"] == pytest.approx(1.0, abs=0.01)
    assert ratio["fp32"] > ratio["tvq8"] > ratio["tvq4"] > ratio["tvq3"] > ratio["tvq2"]
    assert ratio["fq8"] == pytest.approx(ratio["tvq8"], rel=1e-3)   # same bits, a few header bytes apart
    assert ratio["fq4"] == pytest.approx(ratio["tvq4"], rel=1e-3)
    # bytes: about bits/32 of the fp32 checkpoints (norms and biases stay fp32)
    assert ratio["tvq4"] == pytest.approx(4 / 32, abs=0.01)
    assert ratio["tvq2"] == pytest.approx(2 / 32, abs=0.01)
    assert all(sto[s]["bytes"] > 0 for s in sto)
    err = {s: diag[s]["rel_l2_error"] for s in SCHEMES}
    assert err["fp32"] == 0.0
    assert err["tvq8"] < err["tvq4"] < err["tvq3"] < err["tvq2"]
    assert err["fq8"] < err["fq4"]
    assert err["tvq4"] < err["fq4"]
    assert diag["range_ratio"] > 1.0
    assert -1.0 <= diag["task_vector_cosine"] <= 1.0


@pytest.mark.slow
def test_report_files_and_findings(quick_demo):
    out, report = quick_demo
    for name in ("report.md", "accuracy_vs_bits.png", "storage.png", "per_task.png"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    assert "| method | FP32 |" in md and "| task_arithmetic |" in md and "## Findings" in md
    claims = {c["claim"]: c for c in report["findings"]}
    assert "rel. L2 error TVQ8 < TVQ4 < TVQ3 < TVQ2" in claims
    assert claims["rel. L2 error TVQ8 < TVQ4 < TVQ3 < TVQ2"]["holds"]
    for store in ("fp32", "tvq4", "rtvq_b3o2", "budget"):
        assert (out / "stores" / store / "layout.json").is_file()
    assert (out / "adapt" / "fp32" / "tinting.coefficients.json").is_file()
