"""The dense task types (segmentation, depth, normal): each part against a direct reference, then
each type through fine-tuning, merged evaluation, AdaMerging and Tinting on a tiny smp encoder
(``tu-test_resnet``, 3 stages, 16 x 16 images) and a tiny TVQ store, with generated scenes."""
from __future__ import annotations

import copy
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from tvq_lightning.data.multitask import MultiTaskDataModule
from tvq_lightning.errors import TvqError
from tvq_lightning.metrics import MetricEntry, delta_m
from tvq_lightning.models.dense import DenseEncoder, DenseHead
from tvq_lightning.modules import AdaMerging, FineTuneModule, MergedEvaluation, Tinting
from tvq_lightning.store import StoreConfig, TaskVectorStore, quantize_to_store
from tvq_lightning.tasks import create_task_type, list_task_types

TYPES = {"seg": "segmentation", "depth": "depth", "normal": "normal"}
TASKS = list(TYPES)
SIZE, NUM_CLASSES = 16, 3
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")


class TinyScenes(MultiTaskDataModule):
    """Smooth random height fields seen as images; per task its labels, depth or normals, with holes."""

    def __init__(self, train_size: int = 48, test_size: int = 24, batch_size: int = 16, train_task: str | None = None):
        super().__init__(TASKS, batch_size, None, train_task, 0)
        self.sizes = {"train": train_size, "val": test_size, "test": test_size}

    def num_classes(self, task: str) -> int:
        if task != "seg":
            raise NotImplementedError
        return NUM_CLASSES

    def make_split(self, task: str, split: str):
        g = torch.Generator().manual_seed(10 * TASKS.index(task) + ["train", "val", "test"].index(split))
        n = self.sizes[split]
        field = F.interpolate(torch.randn(n, 1, 4, 4, generator=g), size=(SIZE, SIZE), mode="bilinear",
                              align_corners=False)
        images = torch.cat([field, field.roll(2, -1), -field], 1) + 0.1 * torch.randn(n, 3, SIZE, SIZE, generator=g)
        holes = torch.rand(n, SIZE, SIZE, generator=g) < 0.1
        if task == "seg":
            target = torch.bucketize(field[:, 0], torch.tensor([-0.3, 0.3])).masked_fill(holes, -1)
        elif task == "depth":
            target = (2 + field).clamp_min(0.1).masked_fill(holes[:, None], 0.0)
        else:
            gy, gx = torch.gradient(field[:, 0], dim=(1, 2))
            target = F.normalize(torch.stack([-gx, -gy, torch.ones_like(gx)], 1), dim=1) * ~holes[:, None]
        return TensorDataset(images, target)


def _trainer(**kw) -> pl.Trainer:
    opts = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    opts.update(kw)
    return pl.Trainer(**opts)


def _ce(outputs, labels, mask):
    """Reference cross-entropy: -log softmax at the label, averaged over ``mask``."""
    logp = outputs.log_softmax(1).movedim(1, -1)[mask]
    return -logp[torch.arange(len(logp)), labels[mask]].mean()


# -- each part against a direct reference -----------------------------------------------------------------
def test_registered_with_their_metrics():
    assert {"segmentation", "depth", "normal"} <= set(list_task_types())
    seg, depth, normal = (create_task_type(n) for n in TYPES.values())
    assert (seg.main_metric, seg.higher_is_better) == ("miou", True)
    assert (depth.main_metric, depth.higher_is_better) == ("abs_err", False)
    assert (normal.main_metric, normal.higher_is_better) == ("mean_angle", False)
    assert all(tt.trains_head for tt in (seg, depth, normal))
    assert depth.adapts_to_expert and normal.adapts_to_expert and not seg.adapts_to_expert


def test_segmentation_parts():
    tt = create_task_type("segmentation")
    out = torch.randn(2, 4, 5, 6, requires_grad=True)
    labels = torch.randint(0, 4, (2, 5, 6))
    labels[0, 0] = -1
    labels[1, 2, :3] = -3                                      # any negative label is ignored
    valid = labels >= 0
    assert torch.allclose(tt.loss(out, labels), _ce(out, labels, valid))
    empty = tt.loss(out, torch.full_like(labels, -1))
    empty.backward()
    assert float(empty.detach()) == 0 and torch.count_nonzero(out.grad) == 0   # no labelled pixel: a differentiable 0
    ent = torch.distributions.Categorical(logits=out.detach().movedim(1, -1)).entropy().mean()
    assert torch.allclose(tt.adaptation_objective(out.detach()), ent)
    pred, conf = tt.confidence(out.detach())
    assert torch.equal(pred, out.argmax(1)) and torch.allclose(conf, out.softmax(1).amax(1))
    assert torch.equal(tt.predict(out), pred)
    expert = torch.randn(2, 4, 5, 6)
    y_e, c_e = tt.pseudo_targets(expert)
    keep = tt.keep(y_e, c_e, out)
    assert keep.shape == (2, 5, 6) and torch.equal(keep, (y_e == pred) | (c_e >= conf))
    assert torch.allclose(tt.pseudo_target_loss(out, y_e, keep), _ce(out, y_e, keep))
    with pytest.raises(TvqError, match="mean IoU"):
        tt.score(out, labels)


def test_depth_parts():
    tt = create_task_type("depth")
    target = torch.rand(2, 1, 5, 6) + 0.5
    target[0, 0, :2] = 0.0
    out = target + torch.randn(2, 1, 5, 6)
    valid = target > 0
    assert torch.allclose(tt.loss(out, target), (out - target).abs()[valid].mean())
    total, count = tt.score(out, target)
    assert count == valid.sum() and total == pytest.approx(float((out - target).abs()[valid].sum()), rel=1e-5)
    expert = torch.rand(2, 1, 5, 6) + 1
    y_e, c_e = tt.pseudo_targets(expert)
    assert torch.equal(y_e, expert) and c_e.shape == (2, 5, 6)
    assert torch.allclose(tt.expert_objective(out, y_e, c_e), (out - expert).abs().mean())
    with pytest.raises(TvqError, match="no unsupervised objective"):
        tt.adaptation_objective(out)
    # the confidence proxy: 1 on a flat map, lower at a step, the same at any scale
    flat = torch.full((1, 1, 6, 6), 3.0)
    step = flat.clone()
    step[..., 3:] = 6.0
    assert torch.allclose(tt.confidence(flat)[1], torch.ones(1, 6, 6))
    c_step = tt.confidence(step)[1]
    assert c_step[0, 0, 2] < 1 and c_step[0, 0, 0] == 1 and torch.allclose(tt.confidence(5 * step)[1], c_step)
    a = torch.tensor([1.0, 1.0, 2.0, -1.0]).view(1, 1, 1, 4)
    b = torch.tensor([1.04, 1.1, 1.95, 1.0]).view(1, 1, 1, 4)
    assert tt.agree(a, b).tolist() == [[[True, False, True, False]]]
    pred, conf = tt.confidence(out)
    assert torch.equal(tt.keep(y_e, c_e, out), tt.agree(y_e, pred) | (c_e >= conf))
    keep = torch.rand(2, 5, 6) > 0.5
    assert torch.allclose(tt.pseudo_target_loss(out, y_e, keep), (out - expert)[:, 0].abs()[keep].mean())


def test_normal_parts():
    tt = create_task_type("normal")
    target = F.normalize(torch.randn(2, 3, 5, 6), dim=1)
    target[1, :, 1:3] = 0.0
    out = 3 * target + torch.randn(2, 3, 5, 6)
    valid = target.norm(dim=1) > 0
    cos = (F.normalize(out, dim=1) * target).sum(1)
    assert torch.allclose(tt.loss(out, target), (1 - cos)[valid].mean(), atol=1e-6)
    total, count = tt.score(out, target)
    assert count == valid.sum()
    assert total / count == pytest.approx(float(torch.rad2deg(torch.acos(cos[valid].clamp(-1, 1))).mean()), rel=1e-4)
    assert torch.allclose(tt.predict(out).norm(dim=1), torch.ones(2, 5, 6))
    y_e, c_e = tt.pseudo_targets(5 * target + 0.1)
    assert torch.allclose(y_e.norm(dim=1)[valid], torch.ones(int(valid.sum()))) and c_e.shape == (2, 5, 6)
    assert float(tt.confidence(torch.tensor([0.0, 0.0, 2.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4))[1].min()) \
        == pytest.approx(1.0)
    up = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)
    tilted = [torch.tensor([math.sin(math.radians(d)), 0.0, math.cos(math.radians(d))]).view(1, 3, 1, 1) for d in (10, 12)]
    assert tt.agree(up, tilted[0]).item() and not tt.agree(up, tilted[1]).item()
    keep = tt.keep(y_e, c_e, out)
    pred, conf = tt.confidence(out)
    assert torch.equal(keep, tt.agree(y_e, pred) | (c_e >= conf))
    ref = (1 - (F.normalize(out, dim=1) * y_e).sum(1))[keep].mean()
    assert torch.allclose(tt.pseudo_target_loss(out, y_e, keep), ref, atol=1e-6)


@pytest.mark.parametrize("name", list(TYPES.values()))
def test_metrics_heads_and_batch_metrics(name, tmp_path):
    tt = create_task_type(name)
    enc = DenseEncoder("tu-test_resnet", depth=3)
    n = NUM_CLASSES if name == "segmentation" else None
    head = tt.build_head(enc, None, n, steps=5)                  # FineTuneModule passes probe steps
    assert isinstance(head, DenseHead) and head.config["decoder_channels"] == [64, 32, 16]
    assert tt.head_outputs(head) == {"segmentation": NUM_CLASSES, "depth": 1, "normal": 3}[name]
    tt.save_head(head, tmp_path / "h.safetensors")
    again = tt.load_head(tmp_path / "h.safetensors")
    rebuilt = tt.head_from_state(head.state_dict(), tt.head_config(head))
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        feats = enc.eval()(x)
        outputs = head.eval()(feats)
        assert torch.equal(again.eval()(feats), outputs) and torch.equal(rebuilt.eval()(feats), outputs)
    dm = TinyScenes(test_size=4)
    task = next(t for t, v in TYPES.items() if v == name)
    _, target = dm.split(task, "test")[:2]
    metrics = tt.metrics(head)
    assert list(metrics) == [i.name for i in tt.metric_infos] and all(isinstance(m, MetricEntry) for m in metrics.values())
    batch = tt.batch_metrics(outputs, target[:2])
    for k, m in metrics.items():
        m.update(outputs, target[:2])
        assert float(m.compute()) == pytest.approx(float(batch[k]), rel=1e-6, nan_ok=True), k
    assert tt.data_outputs(dm, task) == tt.head_outputs(head)


def test_build_head_reads_channels_off_a_batch_without_out_channels():
    class Plain(torch.nn.Module):      # a multi-scale encoder with no out_channels attribute
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 4, 3, 2, 1), torch.nn.Conv2d(4, 8, 3, 2, 1)

        def forward(self, x):
            f1 = self.a(x)
            return [x, f1, self.b(f1)]

    dm = TinyScenes(train_task="depth")
    head = create_task_type("depth").build_head(Plain(), dm.train_dataloader())
    assert head.config["encoder_channels"] == [3, 4, 8] and head.config["decoder_channels"] == [32, 16]


# -- through the modules -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Fine-tune encoder + decoder per task with FineTuneModule, then store the encoders' task vectors."""
    root = tmp_path_factory.mktemp("dense-types")
    torch.manual_seed(0)
    base = DenseEncoder("tu-test_resnet", depth=3)
    pre = {k: v.detach().clone() for k, v in base.state_dict().items()}
    heads, fts, logged = {}, {}, {}
    for t in TASKS:
        torch.manual_seed(1)
        m = FineTuneModule(copy.deepcopy(base), t, task_type=TYPES[t], lr=5e-3, weight_decay=0.0, warmup_steps=0)
        dm = TinyScenes(train_task=t)
        _trainer(max_steps=24).fit(m, dm)
        assert all(p.requires_grad for p in m.head.parameters())
        tester = _trainer()
        tester.test(m, dm, verbose=False)
        logged[t] = {k: float(v) for k, v in tester.callback_metrics.items()}
        heads[t] = copy.deepcopy(m.head).requires_grad_(False).eval()
        fts[t] = {k: v.detach().clone() for k, v in m.encoder.state_dict().items()}
    quantize_to_store(pre, fts, root / "store", StoreConfig("tvq", bits=8), progress=False)
    return {"pre": pre, "heads": heads, "store": root / "store", "logged": logged}


def _encoder(state) -> DenseEncoder:
    enc = DenseEncoder("tu-test_resnet", depth=3)
    enc.load_state_dict(state)
    return enc.eval()


def _task_model_state(experts, coeffs: dict[str, float]) -> dict[str, torch.Tensor]:
    """theta_0 + sum_t c_t tau_t; BatchNorm statistics: theta_0 + mean_t tau_t (``bn_stats="mean"``)."""
    bn = {f"{n}.{s}" for n, mod in _encoder(experts["pre"]).named_modules()
          if isinstance(mod, torch.nn.BatchNorm2d) for s in ("running_mean", "running_var")}
    with TaskVectorStore(experts["store"]) as st:
        def merged(k, v):
            weights = {t: 1 / len(coeffs) for t in coeffs} if k in bn else coeffs
            return (v + sum(c * st.task_vector(t, k, v) for t, c in weights.items())).to(v.dtype)
        return {k: merged(k, v) if k in st.keys else v for k, v in experts["pre"].items()}


def _direct_metrics(experts, state, task: str) -> dict[str, float]:
    tt = create_task_type(TYPES[task])
    x, target = TinyScenes().split(task, "test").tensors
    metrics = tt.metrics(experts["heads"][task])
    with torch.no_grad():
        outputs = experts["heads"][task](_encoder(state)(x))
    for m in metrics.values():
        m.update(outputs, target)
    return {k: float(m.compute()) for k, m in metrics.items()}


def test_finetuned_experts_learn_their_tasks(experts):
    log = experts["logged"]
    assert set(log["seg"]) >= {"test/loss", "test/miou", "test/pixel_acc"}
    assert set(log["normal"]) >= {"test/mean_angle", "test/median_angle", "test/within_30"}
    _, depth = TinyScenes().split("depth", "test").tensors
    assert log["depth"]["test/abs_err"] < 0.5 * float(depth[depth > 0].mean())   # far better than predicting 0
    assert log["normal"]["test/mean_angle"] < 30 and log["seg"]["test/miou"] > 0.5


def test_merged_evaluation_matches_a_direct_computation(experts):
    lam = 0.4
    m = MergedEvaluation(_encoder(experts["pre"]), TASKS, heads=experts["heads"], store=str(experts["store"]),
                         method="task_arithmetic", method_options={"scaling": lam}, task_types=TYPES,
                         bn_stats="mean")
    _trainer().test(m, TinyScenes(), verbose=False)
    state = _task_model_state(experts, {t: lam for t in TASKS})
    results = {}
    for t in TASKS:
        want = _direct_metrics(experts, state, t)
        results[t] = {k: m.metric_results[k][t] for k in want}
        for k, v in want.items():
            assert results[t][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (t, k)
    assert m.metric_names[:3] == ["miou", "abs_err", "mean_angle"] and m.sample_counts == {t: 24 for t in TASKS}
    individual = {t: _direct_metrics(experts, _task_model_state(experts, {t: 1.0}), t) for t in TASKS}
    signs = {t: {i.name: i.higher_is_better for i in create_task_type(v).metric_infos} for t, v in TYPES.items()}
    terms = [(results[t][k] - individual[t][k]) / individual[t][k] * (1 if signs[t][k] else -1)
             for t in TASKS for k in signs[t]]
    assert delta_m(results, individual, TYPES) == pytest.approx(100 * sum(terms) / len(terms))


def test_adamerging_adapts_depth_and_normals_to_their_experts(experts):
    m = AdaMerging(_encoder(experts["pre"]), str(experts["store"]), TASKS, heads=experts["heads"], granularity="layer",
                   lr=0.05, task_types=TYPES, bn_stats="mean")
    dm = TinyScenes()
    batch = {t: (torch.arange(8), dm.split(t, "test").tensors[0][:8]) for t in TASKS}
    with pytest.raises(TvqError, match="compute_expert_targets"):
        m.adaptation_loss(batch)
    trainer = _trainer(max_steps=3)
    trainer.fit(m, dm)
    assert set(m.expert_targets) == {"depth", "normal"} and m.expert_passes == 1
    assert m.expert_targets["depth"].shape == (24, 1, SIZE, SIZE) and m.expert_conf["normal"].shape == (24, SIZE, SIZE)
    x = dm.split("depth", "test").tensors[0]
    with torch.no_grad():
        expert = experts["heads"]["depth"](_encoder(_task_model_state(experts, {"depth": 1.0}))(x))
    assert torch.allclose(m.expert_targets["depth"], expert, atol=1e-4)
    assert not torch.allclose(m.coefficients, torch.full_like(m.coefficients, 0.3))
    with torch.no_grad():
        feats = m.task_features([batch[t][1] for t in TASKS])
        outputs = {t: experts["heads"][t](f) for t, f in zip(TASKS, feats)}
        want = (create_task_type("segmentation").adaptation_objective(outputs["seg"])
                + (outputs["depth"] - m.expert_targets["depth"][:8]).abs().mean()
                + (1 - F.cosine_similarity(outputs["normal"], m.expert_targets["normal"][:8], dim=1)).mean())
        assert torch.allclose(m.adaptation_loss(batch), want, atol=1e-5)
    trainer.test(m, dm, verbose=False)
    assert set(m.results) == {*TASKS, "avg"} and set(m.metric_results["within_30"]) == {"normal", "avg"}


def test_tinting_caches_maps_per_pixel(experts):
    m = Tinting(_encoder(experts["pre"]), str(experts["store"]), TASKS, heads=experts["heads"], task_types=TYPES,
                step_mode="joint", lr=1e-2, bn_stats="mean")
    heads = [p.detach().clone() for p in m.model.heads.parameters()]
    trainer = _trainer(max_steps=2)
    trainer.fit(m, TinyScenes())
    shapes = {"seg": (24, SIZE, SIZE), "depth": (24, 1, SIZE, SIZE), "normal": (24, 3, SIZE, SIZE)}
    for t in TASKS:
        assert m.expert_targets[t].shape == shapes[t] and m.expert_conf[t].shape == (24, SIZE, SIZE)
    assert m.expert_targets["seg"].dtype == torch.long and m.expert_passes == 1
    assert 0 < float(trainer.callback_metrics["train/kept"]) <= 1
    assert any(not torch.equal(a, b) for a, b in zip(m.model.heads.parameters(), heads))   # the decoders tinted
    trainer.test(m, TinyScenes(), verbose=False)
    assert set(m.results) == {*TASKS, "avg"}
