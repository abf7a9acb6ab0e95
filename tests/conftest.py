"""Shared pytest setup: offline Hugging Face hub and a fixed torch seed for every test."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch's OpenMP runtime and numba's (the fused quantization kernels) each keep their worker
# threads spinning after a parallel region; on a machine with few cores the two pools then
# steal each other's time slices and every small quantize/dequantize call costs ~20-40 ms instead
# of ~0.5 ms. Passive waiting removes the contention; it must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# the CLI fixes glibc's mmap threshold for streaming memory (tvq_lightning/runtime.py); called
# in-process by many tests, it would make every later training test about twice as slow
os.environ.setdefault("TVQ_MMAP_THRESHOLD", "off")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    yield
