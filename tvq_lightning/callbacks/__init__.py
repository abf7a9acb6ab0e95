"""Lightning callbacks, one per file: quantize-on-save, bit allocation, multi-task report, head saving."""
from .bit_allocation import BitAllocation
from .quantize_on_save import QuantizeOnSave
from .report import MultiTaskReport
from .save_head import SaveHead

__all__ = ["BitAllocation", "MultiTaskReport", "QuantizeOnSave", "SaveHead"]
