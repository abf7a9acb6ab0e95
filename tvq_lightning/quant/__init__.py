"""Pure tensor functions: the affine quantizer, bit packing, FQ / TVQ / RTVQ, bit allocation."""
from .config import QuantSpec
from .policy import is_quantized, list_policies
from .qtensor import QTensor
from .schemes import fq_quantize, fq_task_vector, relative_l2_error, rtvq_quantize, rtvq_reconstruct, tvq_quantize

__all__ = ["QTensor", "QuantSpec", "fq_quantize", "fq_task_vector", "is_quantized", "list_policies",
           "relative_l2_error", "rtvq_quantize", "rtvq_reconstruct", "tvq_quantize"]
