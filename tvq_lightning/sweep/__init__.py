"""The reproduction sweep: stores of the chosen schemes, every method's option chosen on validation
with the FP32 store, every method × scheme evaluated on the test splits, written as a table.

:mod:`.core` holds the cell loop (shared with ``tvq demo``), :mod:`.backends` what evaluates the
models, :mod:`.run` the ``tvq sweep`` driver and :mod:`.table` its outputs.
"""
from .core import MERGE_METHODS, Backend, CellCache, SweepPlan, run_cells

__all__ = ["MERGE_METHODS", "Backend", "CellCache", "SweepPlan", "run_cells"]
