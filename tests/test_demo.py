"""``tvq demo --quick``: the whole pipeline on a generated model, and the storage table it reports."""
from __future__ import annotations

import json

import pytest

from tvq_lightning.cli.main import main


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| scheme | bits/param/task | bytes on disk |" in printed
    for label in ("FP32", "FQ-INT4", "TVQ-INT4", "TVQ-INT2", "RTVQ-B3O2"):
        assert f"| {label} |" in printed

    report = json.loads((out / "storage.json").read_text())
    rows = report["storage"]
    for name in ("fp32", "fq8", "fq4", "tvq8", "tvq4", "tvq3", "tvq2", "rtvq_b3o2", "budget"):
        assert name in rows, name
    assert (out / "storage.md").read_text().strip() in printed
    ratio = {k: r["ratio_to_fp32"] for k, r in rows.items()}
    err = {k: r["rel_l2_error"] for k, r in rows.items()}
    assert ratio["fp32"] > ratio["tvq8"] > ratio["tvq4"] > ratio["tvq3"] > ratio["tvq2"]
    assert ratio["fp32"] == pytest.approx(1.0, abs=0.05)
    assert err["fp32"] == 0.0
    assert err["tvq8"] < err["tvq4"] < err["tvq3"] < err["tvq2"]
    assert err["fq4"] >= 10 * err["tvq4"]
    assert err["fq8"] > err["tvq8"]
    assert ratio["rtvq_b3o2"] < ratio["tvq3"]  # 2 + 3/4 bits per param per task
    assert rows["budget"]["bits_per_param"] <= 2.5 + 1e-9
    for r in rows.values():
        assert r["bytes"] > 0 and r["theoretical_ratio"] <= r["ratio_to_fp32"]
    assert report["export_max_abs_error"] < 1e-2
    assert (out / "stores" / "tvq4" / "layout.json").is_file()
    assert (out / "task0_finetuned_from_tvq4.safetensors").is_file()
