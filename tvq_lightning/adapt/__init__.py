"""Test-time adaptation over packed task vectors: device-resident codes and a merge that decodes
them in forward and again in backward (see :mod:`.packed` and :mod:`.merge_fn`)."""
from .merge_fn import MergeKey, base_tensors, check_coefficients, merged_params
from .packed import PackedTaskVectors

__all__ = ["MergeKey", "PackedTaskVectors", "base_tensors", "check_coefficients", "merged_params"]
