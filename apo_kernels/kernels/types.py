"""Triton dtypes of the torch dtypes the kernels see."""

import torch
import triton.language as tl

TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}
