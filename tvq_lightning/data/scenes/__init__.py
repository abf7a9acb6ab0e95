"""The embedded dense benchmark: rendered indoor scenes with segmentation, depth and normal targets.

- :mod:`.camera`, :mod:`.geometry`: pinhole cameras and batched ray casting (planes, boxes,
  spheres, upright cylinders);
- :mod:`.shading`: textures, Lambertian shading, noise; :mod:`.sampling`: scene distributions;
- :mod:`.render`: images and exact per-pixel targets; :mod:`.generate`: splits, caching, the
  pre-training stream; :mod:`.datamodule`: :class:`SceneTasks`;
- :mod:`.encoder`: θ0 (:func:`load_scene_encoder`); :mod:`.pretrain`: its pre-training recipe.
"""
from .datamodule import OUT_CHANNELS, TASKS, SceneTasks
from .encoder import load_scene_encoder
from .generate import IMAGE_SIZE, PRETRAIN_LABELS, PRETRAIN_VERSION, SCENES_VERSION, SPLIT_SIZES, scene_split
from .sampling import CLASSES, PRETRAIN_SPEC, TASKS_SPEC, SceneSpec

__all__ = ["CLASSES", "IMAGE_SIZE", "OUT_CHANNELS", "PRETRAIN_LABELS", "PRETRAIN_SPEC", "PRETRAIN_VERSION",
           "SCENES_VERSION", "SPLIT_SIZES", "TASKS", "TASKS_SPEC", "SceneSpec", "SceneTasks", "load_scene_encoder",
           "scene_split"]
