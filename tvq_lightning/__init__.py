"""tvq_lightning: memory-efficient multi-task model merging with quantized task vectors."""
__version__ = "0.1.0"
