"""Tile sizes, warps and scratch budget of the LM-head kernels, and the dtypes their matmuls use."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton.language as tl

from ..logprobs import triton_interpreted


@dataclass(frozen=True)
class TileConfig:
    """Launch parameters shared by the forward and both backward kernels.

    ``block_n`` tokens x ``block_v`` vocabulary columns is one logit tile, built from ``block_d``-wide
    slices of the hidden size. ``scratch_bytes`` bounds the float32 accumulator of one backward pass
    when the gradient itself is stored in a 16-bit dtype (see ``linear_function``).
    The defaults are chosen for Hopper (128 x 128 x 64 tensor-core tiles, 8 warps) and are unmeasured.
    """

    block_n: int = 128
    block_v: int = 128
    block_d: int = 64
    num_warps: int = 8
    num_stages: int = 3
    scratch_bytes: int = 48 * 2**20

    def __post_init__(self) -> None:
        for name in ("block_n", "block_v", "block_d"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two >= 16 (tl.dot), got {size}")


DEFAULT_TILES = TileConfig()

TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def operand_dtype(hidden: torch.Tensor, weight: torch.Tensor, acc: torch.dtype) -> torch.dtype:
    """Dtype the matmul operands are rounded to: the shared 16-bit dtype of hidden and weight (tensor
    cores, float32 accumulation), else the accumulation dtype (mixed inputs are upcast, never rounded down)."""
    if hidden.dtype == weight.dtype and hidden.dtype in (torch.float16, torch.bfloat16):
        return hidden.dtype
    return acc


def dot_dtype(operand: torch.dtype, acc: torch.dtype) -> torch.dtype:
    """Dtype ``tl.dot`` runs in. The interpreter (Triton 3.9) multiplies 16-bit operands wrongly, so there
    16-bit operands are upcast to float32 first: exact, since products of 16-bit floats fit in float32."""
    return acc if triton_interpreted() and operand in (torch.float16, torch.bfloat16) else operand
