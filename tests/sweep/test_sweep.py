"""``tvq sweep``: the model backend through Lightning against a direct computation, resuming, the dry
run, config errors; the embedded backend reproduces ``tvq demo``'s cells exactly."""
from __future__ import annotations

import json

import pytest
import torch

from tvq_lightning.cli.main import main
from tvq_lightning.data.multitask import ToyTasks
from tvq_lightning.errors import TvqError
from tvq_lightning.merging.engine import merge_state_dict
from tvq_lightning.models.encoders import create_encoder
from tvq_lightning.models.heads import ClassificationHead
from tvq_lightning.store.checkpoints import load_state_dict
from tvq_lightning.store.reader import TaskVectorStore
from tvq_lightning.store.st_stream import save_safetensors
from tvq_lightning.sweep.config import SweepConfig
from tvq_lightning.sweep.run import run_sweep

TASKS = ("a", "b")
DATA = {"class_path": "tvq_lightning.data.multitask.ToyTasks",
        "init_args": {"num_classes": 4, "val_size": 32, "test_size": 48, "batch_size": 16}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    (root / "heads").mkdir()
    enc = create_encoder("tiny", seed=0)
    theta0 = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    save_safetensors(theta0, root / "theta0.safetensors")
    finetuned = {}
    for i, t in enumerate(TASKS):
        g = torch.Generator().manual_seed(i + 1)
        ft = {k: v + 0.02 * v.std().clamp_min(1e-3) * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
              for k, v in theta0.items()}
        finetuned[t] = str(save_safetensors(ft, root / f"{t}.safetensors"))
        g = torch.Generator().manual_seed(100 + i)
        ClassificationHead(torch.randn(4, 32, generator=g)).save(root / "heads" / f"{t}.safetensors")
    return root, finetuned


def _cfg(root, finetuned, out, **kw) -> SweepConfig:
    base = dict(out=str(out), backend="model", pretrained=str(root / "theta0.safetensors"), finetuned=finetuned,
                schemes=("fp32", "tvq2"), methods=("task_arithmetic", "emr"), all_methods_schemes=("fp32", "tvq2"),
                scaling_grid=(0.5, 1.0), encoder={"kind": "tiny", "seed": 0}, heads_dir=str(root / "heads"),
                data=DATA, trainer={"accelerator": "cpu", "devices": 1}, progress=False)
    base.update(kw)
    return SweepConfig(**base)


def _direct_accuracy(params, root, split="test") -> dict[str, float]:
    """Accuracy (%) of the encoder with ``params`` on each task, computed without Lightning."""
    enc = create_encoder("tiny", seed=0)
    enc.load_state_dict({**enc.state_dict(), **params})
    enc.eval()
    dm = ToyTasks(tasks=TASKS, **DATA["init_args"])
    out = {}
    for t in TASKS:
        x, y = dm.make_split(t, split).tensors
        head = ClassificationHead.load(root / "heads" / f"{t}.safetensors")
        with torch.no_grad():
            out[t] = 100.0 * float((head(enc(x)).argmax(-1) == y).float().mean())
    return out


@pytest.mark.slow
def test_model_backend_equals_a_direct_evaluation_and_resumes(inputs, tmp_path):
    root, finetuned = inputs
    out = tmp_path / "sweep"
    report = run_sweep(_cfg(root, finetuned, out))
    res = report["results"]
    assert set(res) == {"individual", "task_arithmetic", "emr"}
    assert set(res["task_arithmetic"]) == {"fp32", "tvq2"}
    ta = res["task_arithmetic"]["fp32"]
    assert ta["value"] in (0.5, 1.0) and set(ta["val_sweep"]) == {"0.5", "1.0"}
    # task arithmetic at the chosen λ, merged and evaluated here directly
    store = TaskVectorStore(out / "stores" / "fp32")
    merged = merge_state_dict(store, root / "theta0.safetensors", "task_arithmetic", scaling=ta["value"])
    direct = _direct_accuracy(merged, root)
    for t in TASKS:
        assert ta["per_task"][t] == pytest.approx(direct[t], abs=1e-6)
    # the validation sweep picked the best λ by the validation mean
    best = max(ta["val_sweep"], key=ta["val_sweep"].get)
    assert float(best) == ta["value"]
    # individual models: θ0 + τ̂_t on task t (the 2-bit store's)
    q = TaskVectorStore(out / "stores" / "tvq2")
    pre = {k: v for k, v in load_state_dict(root / "theta0.safetensors").items()}
    for t in TASKS:
        own = {k: pre[k] + q.task_vector(t, k, pre[k]) for k in q.keys}
        assert res["individual"]["tvq2"]["per_task"][t] == pytest.approx(_direct_accuracy(own, root)[t], abs=1e-6)
    files = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    assert len(files) == 2 * 3     # individual + 2 methods, on 2 stores
    for name in ("results.json", "table.md", "table.png"):
        assert (out / name).stat().st_size > 0
    assert "| task_arithmetic |" in (out / "table.md").read_text()
    # a rerun reads every cell back; a changed grid recomputes the cells that depend on it
    again = run_sweep(_cfg(root, finetuned, out))
    assert again["results"] == res
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == files
    run_sweep(_cfg(root, finetuned, out, scaling_grid=(0.5, 0.75, 1.0)))
    now = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    assert now["individual.fp32.json"] == files["individual.fp32.json"]
    assert now["task_arithmetic.fp32.json"] != files["task_arithmetic.fp32.json"]


@pytest.mark.slow
def test_dry_run_lists_the_cells_through_the_cli(inputs, tmp_path, capsys):
    root, finetuned = inputs
    ft = "{" + ", ".join(f"{t}: {p}" for t, p in finetuned.items()) + "}"
    rc = main(["sweep", "--pretrained", str(root / "theta0.safetensors"), "--finetuned", ft,
               "--schemes", "[fp32,tvq4]", "--methods", "[task_arithmetic,ties]", "--encoder", "{kind: tiny, seed: 0}",
               "--heads_dir", str(root / "heads"), "--data", json.dumps(DATA), "--dry_run", "--no-progress",
               "--out", str(tmp_path / "dry")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "dry run: 2 tasks (a, b)" in text and "4 method cells" in text


@pytest.mark.parametrize("kw, words", [
    ({"schemes": ("tvq4",)}, "fp32 is needed"),
    ({"schemes": ("fp32", "int3")}, "unknown scheme 'int3'"),
    ({"methods": ("adamerging",)}, "'adamerging' is not swept"),
    ({"encoder": {}}, "--encoder"),
    ({"encoder": {"model_name": "x"}}, "give its kind"),
    ({"data": {"init_args": {}}}, "class_path"),
    ({"trainer": {"devices": 2}}, "devices=2 would start one process per device"),
    ({"trainer": {"devices": "auto"}}, "devices='auto'"),
    ({"trainer": {"devices": [0, 1]}}, r"devices=\[0, 1\]"),
    ({"trainer": {"num_nodes": 2}}, "num_nodes=2"),
    ({"trainer": {"devices": 1, "strategy": "ddp"}}, "strategy='ddp'"),
])
def test_config_errors_name_the_option(inputs, tmp_path, kw, words):
    root, finetuned = inputs
    with pytest.raises(TvqError, match=words):
        _cfg(root, finetuned, tmp_path / "x", **kw)


def test_bad_data_class_path_is_one_line(inputs, tmp_path, capsys):
    root, finetuned = inputs
    rc = main(["sweep", "--pretrained", str(root / "theta0.safetensors"), "--finetuned",
               json.dumps(finetuned), "--schemes", "[fp32]", "--encoder", "{kind: tiny, seed: 0}",
               "--heads_dir", str(root / "heads"), "--data", '{"class_path": "no.such.Module"}', "--no-progress",
               "--out", str(tmp_path / "bad")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no.such.Module" in err[0]


@pytest.mark.slow
def test_embedded_backend_reproduces_the_demo(tmp_path, monkeypatch):
    """``tvq sweep --backend embedded`` on a quick demo's stores gives the demo's cells exactly."""
    monkeypatch.setenv("TVQ_CACHE_DIR", str(tmp_path / "cache"))
    demo_out = tmp_path / "demo"
    assert main(["demo", "--quick", "--suite", "classification", "--no-progress", "--out", str(demo_out)]) == 0
    demo = json.loads((demo_out / "report.json").read_text())["results"]
    schemes = ["fp32", "tvq4", "tvq2", "rtvq_b3o2"]
    stores = "{" + ", ".join(f"{s}: {demo_out / 'stores' / s}" for s in schemes) + "}"
    assert main(["sweep", "--backend", "embedded", "--demo", "{quick: true}", "--stores", stores,
                 "--schemes", "[" + ",".join(schemes) + "]", "--scaling_grid", "[0.3,0.6,1.0]",
                 "--alpha_grid", "[0.3,1.0]", "--no-progress", "--out", str(tmp_path / "sweep")]) == 0
    swept = json.loads((tmp_path / "sweep" / "results.json").read_text())["results"]
    n = 0
    for method, row in swept.items():
        for scheme, cell in row.items():
            assert cell == demo[method][scheme], (method, scheme)
            n += 1
    assert n == 4 * 8
