"""``tvq sweep``'s settings: one typed, frozen dataclass (every field is a ``tvq sweep`` option and a
key of its YAML config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import TvqError
from .core import MERGE_METHODS, SweepPlan


@dataclass(frozen=True)
class SweepConfig:
    """A reproduction sweep: which stores, which methods, what evaluates them.

    Attributes:
        out: output directory: ``stores/``, ``cells/`` (one file per finished cell: a rerun skips
            them), ``results.json``, ``table.md``, ``table.png``.
        backend: ``model``: a real encoder, its heads and a datamodule through a Lightning Trainer;
            ``embedded``: the embedded benchmark of ``tvq demo`` (its cached features and heads).
        pretrained: θ0 of the merged encoder (a checkpoint file or a model folder); ``embedded``:
            leave empty (the shipped tiny CLIP's).
        finetuned: ``{task: checkpoint}``: the stores of ``schemes`` are built from them (once).
        stores: ``{scheme: store directory}`` already built (e.g. by ``tvq quantize`` or a demo run);
            these are used as they are.
        schemes: the stores to evaluate, by name (fp32, fq8, fq4, tvq8, tvq4, tvq3, tvq2, rtvq_b3o2,
            budget, bitdelta); fp32 is the reference each method's option is chosen with.
        methods: the data-free methods (every one runs on all_methods_schemes; the other schemes get
            individual models and task arithmetic).
        all_methods_schemes: the schemes every method runs on.
        scaling_grid: the values of scaling tried on validation.
        alpha_grid: the values of LiNeS's alpha tried on validation.
        prefix: keep only checkpoint keys under this prefix and strip it (θ0 and fine-tuned).
        pretrained_prefix: θ0's own prefix, when it differs from the fine-tuned files'.
        allow_pickle: read pickled whole-module checkpoints (task_vectors) through the allow-list.
        encoder: ``backend=model``: the encoder, as ``{"kind": NAME, ...its arguments}``
            (``tvq_lightning.models.create_encoder``), e.g. ``{kind: open_clip, model_name: ViT-B-32}``.
        heads_dir: ``backend=model``: one head per task, ``<task>.safetensors`` (``tvq heads``).
        data: ``backend=model``: the datamodule, ``{"class_path": ..., "init_args": {...}}``; its
            ``tasks`` argument is set by the sweep.
        trainer: ``backend=model``: ``lightning.pytorch.Trainer`` arguments (accelerator, devices,
            precision, limit_val_batches, limit_test_batches, ...).
        demo: ``backend=embedded``: ``DemoConfig`` settings (``quick: true`` for its quick variant).
        dry_run: check every input and print the cells, evaluating nothing.
        progress: show a progress bar.
    """

    out: str = "runs/sweep"
    backend: Literal["model", "embedded"] = "model"
    pretrained: str | None = None
    finetuned: dict[str, str] = field(default_factory=dict)
    stores: dict[str, str] = field(default_factory=dict)
    schemes: tuple[str, ...] = ("fp32", "tvq4", "tvq2", "rtvq_b3o2")
    methods: tuple[str, ...] = tuple(MERGE_METHODS)
    all_methods_schemes: tuple[str, ...] = ("fp32", "tvq4", "tvq2", "rtvq_b3o2")
    scaling_grid: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
    alpha_grid: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)
    prefix: str | None = None
    pretrained_prefix: str | None = None
    allow_pickle: bool = False
    encoder: dict[str, Any] = field(default_factory=dict)
    heads_dir: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    demo: dict[str, Any] = field(default_factory=dict)
    dry_run: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        from ..demo.config import SCHEMES

        unknown = [s for s in self.schemes if s not in SCHEMES]
        if unknown:
            raise TvqError(f"sweep schemes: unknown scheme {unknown[0]!r}; choose among {', '.join(SCHEMES)}")
        if "fp32" not in self.schemes:
            raise TvqError("sweep schemes: fp32 is needed (each method's option is chosen on validation with it); add it")
        bad = [m for m in self.methods if m not in MERGE_METHODS]
        if bad:
            raise TvqError(f"sweep methods: {bad[0]!r} is not swept; choose among {', '.join(MERGE_METHODS)}")
        if self.backend == "model":
            missing = [n for n, v in (("pretrained", self.pretrained), ("encoder", self.encoder),
                                      ("heads_dir", self.heads_dir), ("data", self.data)) if not v]
            if missing:
                raise TvqError(f"sweep backend=model needs --{missing[0]} (see tvq sweep --help)")
            if "kind" not in self.encoder:
                raise TvqError("sweep encoder: give its kind, e.g. {kind: open_clip, model_name: ViT-B-32}")
            if "class_path" not in self.data:
                raise TvqError("sweep data: give the datamodule's class_path (and init_args), e.g. "
                               "{class_path: tvq_lightning.data.zoo.CLIPSuiteDataModule, init_args: {root: DATA}}")
        many = _several_processes(self.trainer)
        if many:
            raise TvqError(f"sweep trainer: {many} would start one process per device, and each would run the whole "
                           "sweep; a sweep evaluates in one process: set trainer devices: 1 (and no DDP strategy), "
                           "or run one sweep per device, each with its own --out and a subset of --methods (docs/sweep.md)")
        need = [s for s in self.schemes if s not in self.stores]
        if need and not self.finetuned and self.backend == "model":
            raise TvqError(f"sweep: the {need[0]} store is neither given in --stores nor buildable: give --finetuned TASK=PATH ...")

    def plan(self) -> SweepPlan:
        return SweepPlan(methods={m: MERGE_METHODS[m] for m in self.methods},
                         all_methods_schemes=self.all_methods_schemes, scaling_grid=self.scaling_grid,
                         alpha_grid=self.alpha_grid)


def _several_processes(trainer: dict[str, Any]) -> str | None:
    """The trainer setting that would make Lightning start several processes, as ``name=value``; else None."""
    devices = trainer.get("devices", 1)
    if isinstance(devices, (list, tuple)):
        several = len(devices) > 1
    else:
        text = str(devices).strip()
        several = text in ("-1", "auto") or (text.isdigit() and int(text) > 1) or "," in text.strip(",")
    if several:
        return f"devices={devices!r}"
    if int(trainer.get("num_nodes", 1)) > 1:
        return f"num_nodes={trainer['num_nodes']!r}"
    strategy = str(trainer.get("strategy", "") or "")
    if any(w in strategy for w in ("ddp", "fsdp", "deepspeed")):
        return f"strategy={strategy!r}"
    return None
