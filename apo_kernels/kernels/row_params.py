"""Launch parameters of the row-pass kernels (``logprob_fold``, ``logit_grad``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RowKernelParams:
    """One program per token row streams that row's slab of logits in ``block``-wide pieces.

    The kernels are memory-bound (a few FLOPs per 4-byte logit), so the block only has to keep enough
    loads in flight: 1024 columns over 4 warps is 8 float32 per thread, 16-byte vector loads.
    """

    block: int = 1024
    num_warps: int = 4

    def __post_init__(self) -> None:
        if self.block < 16 or self.block & (self.block - 1):
            raise ValueError(f"RowKernelParams.block must be a power of two >= 16, got {self.block}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"RowKernelParams.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")


DEFAULT_ROW_PARAMS = RowKernelParams()
