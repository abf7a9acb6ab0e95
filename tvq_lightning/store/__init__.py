"""The on-disk store of quantized task vectors: layout, checkpoint readers, writer, lazy reader."""
from .checkpoints import LazyStateDict, load_state_dict, open_checkpoint
from .fingerprint import fingerprint_state_dict
from .layout import Layout, StoreConfig, read_layout
from .reader import TaskVectorStore
from .writer import quantize_to_store

__all__ = ["LazyStateDict", "Layout", "StoreConfig", "TaskVectorStore", "fingerprint_state_dict",
           "load_state_dict", "open_checkpoint", "quantize_to_store", "read_layout"]
