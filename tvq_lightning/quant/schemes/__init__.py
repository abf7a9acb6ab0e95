"""Quantization schemes as registered objects (docs/algorithms.md §3).

``list_schemes()`` names them, ``create_scheme(name)`` / ``get_scheme(name)`` give the
:class:`~.base.Scheme` object that writes, reads, merges, adapts and allocates bits for that
scheme, ``register_scheme`` adds one (a subclass of :class:`~.base.Scheme`; see ``bitdelta.py``
for a complete small example). Built-in: ``fp32``, ``fq``, ``tvq``, ``rtvq``, ``bitdelta``, one
file each. The pure per-tensor functions of FQ / TVQ / RTVQ / BitDelta are importable from here.
"""
from ._registry import create_scheme, get_scheme, is_scheme, list_schemes, register_scheme, registered_scheme, unregister_scheme
from .base import Scheme, relative_l2_error
from .fp32 import FP32
from .fq import FQ, fq_quantize, fq_task_vector
from .tvq import TVQ, tvq_quantize
from .rtvq import RTVQ, RTVQKey, effective_bits_rtvq, rtvq_base, rtvq_offset, rtvq_quantize, rtvq_reconstruct
from .bitdelta import BitDelta, bitdelta_dequantize, bitdelta_quantize

#: the scheme of a ``StoreConfig()`` / ``QuantizeOnSave()`` given no scheme
DEFAULT_SCHEME = TVQ.name

__all__ = ["DEFAULT_SCHEME", "BitDelta", "FP32", "FQ", "RTVQ", "RTVQKey", "Scheme", "TVQ", "bitdelta_dequantize",
           "bitdelta_quantize", "create_scheme", "effective_bits_rtvq", "fq_quantize", "fq_task_vector", "get_scheme",
           "is_scheme", "list_schemes", "register_scheme", "registered_scheme", "relative_l2_error", "rtvq_base",
           "rtvq_offset", "rtvq_quantize", "rtvq_reconstruct", "tvq_quantize", "unregister_scheme"]
