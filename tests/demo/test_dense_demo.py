"""``tvq demo --suite dense --quick`` end to end: the ``"dense"`` section's schema, findings and PNGs."""
from __future__ import annotations

import json

import pytest
from _demo_helpers import isolated_cache

from tvq_lightning.cli.main import main
from tvq_lightning.demo.dense import DENSE_METHODS, DenseDemoConfig
from tvq_lightning.demo.dense.report import DENSE_METHOD_ORDER

MAIN = {"segmentation": "miou", "depth": "abs_err", "normal": "mean_angle"}


@pytest.fixture(scope="module")
def dense_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense_demo")
    out = root / "out"
    with isolated_cache(root):
        assert main(["demo", "--suite", "dense", "--quick", "--no-progress", "--out", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_dense_report_schema(dense_demo):
    _, report = dense_demo
    assert "results" not in report            # --suite dense: no classification part
    d = report["dense"]
    cfg = DenseDemoConfig.quick()
    assert d["tasks"] == list(cfg.tasks)
    res = d["results"]
    assert set(res) <= set(DENSE_METHOD_ORDER)
    assert set(res["individual"]) == set(cfg.schemes)
    assert set(res["task_arithmetic"]) == set(cfg.schemes)
    assert set(res["pretrained_decoders"]) == {"fp32"}
    for method in DENSE_METHODS:
        assert set(res[method]) >= set(cfg.all_methods_schemes), method
    for method, _ in cfg.adapt_runs:
        assert "fp32" in res[method], method
    assert res["individual"]["fp32"]["delta_m"] == pytest.approx(0.0, abs=1e-9)
    for row in res.values():
        for cell in row.values():
            assert isinstance(cell["delta_m"], float)
            assert list(cell["per_task"]) == d["tasks"]
            for t, metrics in cell["per_task"].items():
                assert next(iter(metrics)) == MAIN[t]        # the main metric first
    assert res["task_arithmetic"]["fp32"]["value"] in cfg.scaling_grid
    assert "delta_m_vs_pretrained_decoders" in res["task_arithmetic"]["fp32"]
    sto = d["storage"]
    assert set(sto) == set(cfg.schemes)
    assert sto["fp32"]["ratio_to_fp32"] == pytest.approx(1.0, abs=0.01)
    assert sto["fp32"]["bytes"] > sto["tvq4"]["bytes"] > sto["tvq2"]["bytes"] > sto["bitdelta"]["bytes"] > 0
    assert d["diagnostics"]["fp32"]["rel_l2_error"] == 0.0
    assert d["diagnostics"]["tvq4"]["rel_l2_error"] < d["diagnostics"]["tvq2"]["rel_l2_error"]
    assert d["bn_stats"] == "mean"
    assert set(d["timings"]) >= {"setup", "finetune", "stores", "merge", "adapt", "report", "total"}
    assert report["timings"]["dense"] == pytest.approx(d["timings"]["total"])


@pytest.mark.slow
def test_dense_findings_and_files(dense_demo):
    out, report = dense_demo
    claims = [f["claim"] for f in report["dense"]["findings"]]
    assert len(claims) == 8
    for f in report["dense"]["findings"]:
        assert set(f) == {"claim", "value", "holds"} and isinstance(f["holds"], bool)
    for key in ("TVQ-INT4 within 1 %", "TVQ-INT2 worse", "RTVQ B3O2 better", "RTVQ B3O2 at <= 8 %", "dense adaptation",
                "θ0 with trained"):
        assert any(key in c for c in claims), key
    for name in ("dense_delta_m", "dense_segmentation", "dense_depth", "dense_normal"):
        png = out / "dense" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    md = (out / "report.md").read_text()
    assert "# Dense suite" in md and "Dense findings" in md and '"mean"' in md


def _cell(dm: float) -> dict:
    return {"delta_m": dm, "per_task": {"segmentation": {"miou": 50.0}}}


@pytest.mark.parametrize("tasks, ratio, holds", [(3, 0.0968, False), (8, 0.0767, True)])
def test_rtvq_bytes_finding_states_the_bit_count_theory(tasks, ratio, holds):
    from tvq_lightning.demo.dense.report import findings

    section = {"tasks": ["segmentation"] * tasks, "storage": {"rtvq_b3o2": {"ratio_to_fp32": ratio}},
               "results": {"individual": {"rtvq_b3o2": _cell(-4.0), "tvq2": _cell(-8.0)},
                           "task_arithmetic": {"rtvq_b3o2": _cell(-20.0), "tvq2": _cell(-13.0)}}}
    got = {f["claim"]: f for f in findings(section)}
    assert got["RTVQ B3O2 better than TVQ-INT2 (individual, Δm)"]["holds"]
    assert not got["RTVQ B3O2 better than TVQ-INT2 (task_arithmetic, Δm)"]["holds"]
    size = got["RTVQ B3O2 at <= 8 % of the fp32 bytes"]
    assert size["holds"] is holds
    assert f"{100 * (3 + 2 * tasks) / (32 * tasks):.2f} %" in size["value"]


def test_dense_config_checks():
    from tvq_lightning.errors import TvqError

    with pytest.raises(TvqError, match="unknown scene task"):
        DenseDemoConfig(tasks=("segmentation", "colour"))
    with pytest.raises(TvqError, match="fp32"):
        DenseDemoConfig(schemes=("tvq4",))
    assert DenseDemoConfig.quick().finetune_steps < DenseDemoConfig().finetune_steps
