"""Which tensors take the CUDA path, with a seam for the CPU dry run of that path.

The dry run (``benchmarks/dry_run.py``) runs the CUDA path on ``meta`` tensors: within :func:`meta_as_cuda`
they take every CUDA branch (cuBLAS ``out_dtype`` matmuls, the Triton backend, CUDA's workspace and chunk
rules) as on a GPU with that much memory; outside it, meta tensors are CPU-like.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

_META_AS_CUDA_MEMORY: Optional[int] = None


@contextlib.contextmanager
def meta_as_cuda(total_memory: int):
    """Within this block, ``meta`` tensors stand for CUDA tensors on a GPU of ``total_memory`` bytes."""
    global _META_AS_CUDA_MEMORY
    saved, _META_AS_CUDA_MEMORY = _META_AS_CUDA_MEMORY, total_memory
    try:
        yield
    finally:
        _META_AS_CUDA_MEMORY = saved


def is_cuda(device: torch.device) -> bool:
    """Whether tensors on ``device`` take the CUDA path (a CUDA device, or ``meta`` under :func:`meta_as_cuda`)."""
    return device.type == "cuda" or (device.type == "meta" and _META_AS_CUDA_MEMORY is not None)


def total_memory(device: torch.device) -> int:
    """The memory of the CUDA device (or of the GPU meta tensors stand for)."""
    assert is_cuda(device)
    return _META_AS_CUDA_MEMORY if device.type == "meta" else torch.cuda.get_device_properties(device).total_memory
