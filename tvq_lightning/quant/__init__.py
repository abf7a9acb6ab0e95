"""Pure tensor functions (the affine quantizer, bit packing, bit allocation) and the scheme registry."""
from .config import QuantSpec
from .policy import is_quantized, list_policies
from .qtensor import QTensor
from .schemes import (Scheme, create_scheme, fq_quantize, fq_task_vector, get_scheme, list_schemes, register_scheme,
                      registered_scheme, relative_l2_error, rtvq_quantize, rtvq_reconstruct, tvq_quantize,
                      unregister_scheme)

__all__ = ["QTensor", "QuantSpec", "Scheme", "create_scheme", "fq_quantize", "fq_task_vector", "get_scheme",
           "is_quantized", "list_policies", "list_schemes", "register_scheme", "registered_scheme",
           "relative_l2_error", "rtvq_quantize", "rtvq_reconstruct", "tvq_quantize", "unregister_scheme"]
