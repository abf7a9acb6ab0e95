"""Test-time adaptation over packed task vectors: device-resident codes and a merge that decodes
them in forward and again in backward (see :mod:`.packed` and :mod:`.merge_fn`), built either all
at once or block by block inside the forward (:mod:`.streamed`)."""
from .merge_fn import MergeKey, base_tensors, check_coefficients, merged_params
from .packed import PackedTaskVectors
from .streamed import StreamedEncoder, find_units

__all__ = ["MergeKey", "PackedTaskVectors", "StreamedEncoder", "base_tensors", "check_coefficients", "find_units",
           "merged_params"]
