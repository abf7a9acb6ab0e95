"""The dense demo's settings: one frozen dataclass; ``DenseDemoConfig.quick()`` is the test-suite variant."""
from __future__ import annotations

from dataclasses import dataclass, replace

from ...data.scenes import TASKS
from ...errors import TvqError

#: the stores of the dense part (names as the classification part's SCHEMES)
DENSE_SCHEMES = ("fp32", "tvq4", "tvq2", "rtvq_b3o2", "bitdelta")
#: the data-free methods run on the encoder (the option swept on validation; None: defaults)
DENSE_METHODS: dict[str, str | None] = {
    "task_arithmetic": "scaling", "ties": "scaling", "magmax": "scaling", "breadcrumbs": "scaling",
    "emr": None, "consensus": "scaling", "lines": "alpha",
}
#: the two metrics per task that Δm averages (each task's mean first, then the mean over tasks):
#: the prototype's definition (docs/embedded-benchmark.md, "The dense demo")
DELTA_M_METRICS: dict[str, tuple[str, str]] = {
    "segmentation": ("miou", "pixel_acc"), "depth": ("abs_err", "rel_err"), "normal": ("mean_angle", "within_11_25"),
}


@dataclass(frozen=True)
class DenseDemoConfig:
    """Everything that decides the dense demo's numbers (the seed gives the same numbers twice)."""

    seed: int = 0
    tasks: tuple[str, ...] = TASKS
    # 48 x 48 renders: 0.56x the pixels of the prototype's 64 x 64 (the 4-minute budget)
    image_size: int = 48
    train_size: int = 2000
    val_size: int = 100
    test_size: int = 200
    # one UNet decoder per task (the prototype's widths; 0.6 M parameters)
    decoder_channels: tuple[int, ...] = (64, 32, 32, 16, 16)
    # fine-tuning encoder + decoder, one AdamW at lr 1e-3 for both (the prototype: only a strong
    # fine-tune discriminates the schemes), cosine schedule with warm-up
    finetune_steps: int = 300
    # batch 20, not the prototype's 32: the 4-minute budget (0.11 s per step instead of 0.17)
    finetune_batch: int = 20
    finetune_lr: float = 1e-3
    finetune_weight_decay: float = 0.0
    warmup_steps: int = 30
    schemes: tuple[str, ...] = DENSE_SCHEMES
    all_methods_schemes: tuple[str, ...] = ("fp32", "tvq4", "tvq2", "rtvq_b3o2")
    methods: tuple[str, ...] = tuple(DENSE_METHODS)
    # λ = 1 was never chosen (Δm −28 to −41 on validation in every run): left out for the time budget
    scaling_grid: tuple[float, ...] = (0.3, 0.5, 0.7)
    alpha_grid: tuple[float, ...] = (0.3, 0.5)
    # BatchNorm statistics of every merged encoder: the experts' mean (merging/bn_stats.py)
    bn_stats: str = "mean"
    # test-time adaptation on the FP32 store: (method, store)
    adapt_runs: tuple[tuple[str, str], ...] = (("adamerging_layer", "fp32"), ("tinting", "fp32"))
    # 12 images per task and step (16 before): the 4-minute budget
    adapt_batch: int = 12
    adamerging_steps: int = 40
    adamerging_lr: float = 1e-3
    # Model Tinting: the whole task decoder is the task-specific layer ("head"), trained with the
    # layer-wise coefficients against each expert's cached predictions. Chosen by validation Δm on
    # one run (docs/embedded-benchmark.md, "The dense demo"): lr 2e-4 and 120 steps over 1e-3 / 40,
    # and every pixel (Tinting++'s confidence sampling keeps few of the pixels where the merged
    # model confidently disagrees with the expert, and lost validation Δm: -6.71 against -5.15)
    tint: str = "head"
    tinting_steps: int = 120
    tinting_lr: float = 2e-4
    tinting_confidence_sampling: bool = False
    # rows of the picture grid per task
    picture_rows: int = 3

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise TvqError(f"DenseDemoConfig tasks: unknown scene task {unknown[0]!r}; choose from {', '.join(TASKS)}")
        bad = [m for m in self.methods if m not in DENSE_METHODS]
        if bad:
            raise TvqError(f"DenseDemoConfig methods: {bad[0]!r} is not one of {', '.join(DENSE_METHODS)}")
        if "fp32" not in self.schemes:
            raise TvqError("DenseDemoConfig schemes must include fp32 (λ is chosen with it, Δm is relative to it)")

    @classmethod
    def quick(cls, **overrides) -> DenseDemoConfig:
        """Tiny sizes and few steps: the whole dense pipeline in well under a minute."""
        base = cls(image_size=32, train_size=64, val_size=16, test_size=16, decoder_channels=(16, 16, 16, 8, 8),
                   finetune_steps=6, finetune_batch=16, warmup_steps=1, all_methods_schemes=("fp32",),
                   scaling_grid=(0.3, 1.0), alpha_grid=(0.3,),
                   adapt_batch=8, adamerging_steps=2, tinting_steps=2, picture_rows=2)
        return replace(base, **overrides)
