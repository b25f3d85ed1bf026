"""Backward row pass: the logit gradient ``dz`` of one tile, from the forward's saved statistics.

Per row (one program each): ``z = logits / tau + b``, ``p = exp((z - m) - log_sum)`` and
``dz = g_logp (onehot - p) - g_H p ((z - m) - (E[z] - m))``, times ``dz_scale`` when given (a power of two
that keeps float16 ``dz`` out of the subnormals), written in the operand dtype (it feeds the ``dz W`` and
``dz^T X`` matmuls). With ``HAS_ROWSUM`` the row's sum of the *rounded* ``dz`` is added to
``rowsum``: the driver's centering of ``dX`` needs exactly what the matmul saw.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import eager_or_op, on_device_of
from .scaled_logits import scaled_logits
from .types import TL_DTYPES


@triton.jit
def _logit_grad_kernel(
    logits_ptr,
    stride_row,
    n_cols,
    dz_ptr,
    stride_dz,
    rowsum_ptr,
    stats_ptr,
    stride_stats,
    targets_ptr,
    stride_t,
    g_logp_ptr,
    stride_gl,
    g_ent_ptr,
    stride_ge,
    v0,
    inv_temp_ptr,
    bias_ptr,
    stride_b,
    dz_scale_ptr,
    HAS_BIAS: tl.constexpr,
    HAS_G_LOGP: tl.constexpr,
    HAS_G_ENT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_ROWSUM: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
    OUT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_logits = logits_ptr + row * stride_row
    row_dz = dz_ptr + row * stride_dz
    inv_temp = tl.load(inv_temp_ptr)
    row_max = tl.load(stats_ptr + row)
    log_sum = tl.load(stats_ptr + stride_stats + row)
    mean_shifted = tl.load(stats_ptr + 2 * stride_stats + row)
    target_col = tl.load(targets_ptr + row * stride_t) - v0
    if HAS_G_LOGP:
        g_logp = tl.load(g_logp_ptr + row * stride_gl).to(ACC)
    if HAS_G_ENT:
        g_ent = tl.load(g_ent_ptr + row * stride_ge).to(ACC)
    if HAS_SCALE:
        dz_scale = tl.load(dz_scale_ptr).to(ACC)
    block_sum = tl.zeros((BLOCK,), ACC)
    for c0 in range(0, n_cols, BLOCK):
        cols, ok, z = scaled_logits(row_logits, bias_ptr, stride_b, c0, n_cols, inv_temp, HAS_BIAS, BLOCK, ACC)
        shifted = tl.where(ok, z, row_max) - row_max  # 0 past the slab: no exp overflow in dead lanes
        # (z - m) - log_sum subtracts numbers of similar size, as torch.log_softmax does
        p = tl.exp(shifted - log_sum)
        dz = tl.zeros((BLOCK,), ACC)
        if HAS_G_LOGP:
            dz += g_logp * (tl.where(cols == target_col, 1.0, 0.0) - p)
        if HAS_G_ENT:
            dz -= g_ent * p * (shifted - mean_shifted)
        if HAS_SCALE:
            dz *= dz_scale
        rounded = dz.to(OUT)
        tl.store(row_dz + cols, rounded, mask=ok)
        if HAS_ROWSUM:
            block_sum += tl.where(ok, rounded.to(ACC), 0.0)
    if HAS_ROWSUM:
        tl.store(rowsum_ptr + row, tl.load(rowsum_ptr + row) + tl.sum(block_sum, 0))


def launch_logit_grad(
    logits: torch.Tensor,
    out: Optional[torch.Tensor],
    rowsum: Optional[torch.Tensor],
    stats: torch.Tensor,
    targets: torch.Tensor,
    grad_logp: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
    v0: int,
    inv_temp: torch.Tensor,
    bias: Optional[torch.Tensor],
    dz_scale: Optional[torch.Tensor],
    block: int,
    num_warps: int,
) -> None:
    """``logits`` and ``out`` ``(rows, cols)`` with unit column stride (``out=None``: over ``logits``, same
    dtype; the custom op could not track the mutation of an alias); ``stats`` ``(3, rows)``; ``rowsum``
    ``(rows,)`` contiguous or None."""
    out = logits if out is None else out
    rows, cols = logits.shape
    if rows == 0:
        return
    with on_device_of(logits):
        _logit_grad_kernel[(rows,)](
            logits,
            logits.stride(0),
            cols,
            out,
            out.stride(0),
            rowsum,
            stats,
            stats.stride(0),
            targets,
            targets.stride(0),
            grad_logp,
            0 if grad_logp is None else grad_logp.stride(0),
            grad_entropy,
            0 if grad_entropy is None else grad_entropy.stride(0),
            v0,
            inv_temp,
            bias,
            0 if bias is None else bias.stride(0),
            dz_scale,
            HAS_BIAS=bias is not None,
            HAS_G_LOGP=grad_logp is not None,
            HAS_G_ENT=grad_entropy is not None,
            HAS_SCALE=dz_scale is not None,
            HAS_ROWSUM=rowsum is not None,
            BLOCK=block,
            ACC=TL_DTYPES[logits.dtype],
            OUT=TL_DTYPES[out.dtype],
            num_warps=num_warps,
        )


logit_grad_op = torch.library.custom_op(
    "apo_kernels::logit_grad", launch_logit_grad, mutates_args=("logits", "out", "rowsum")
)


@logit_grad_op.register_fake
def _(
    logits, out, rowsum, stats, targets, grad_logp, grad_entropy, v0, inv_temp, bias, dz_scale, block, num_warps
) -> None:
    return None


def logit_grad(
    logits, out, rowsum, stats, targets, grad_logp, grad_entropy, v0, inv_temp, bias, dz_scale, block, num_warps
):
    """Write ``dz`` (see :func:`launch_logit_grad`), launched as ``launch.eager_or_op`` says."""
    eager_or_op(logit_grad_op, launch_logit_grad, logits)(
        logits, out, rowsum, stats, targets, grad_logp, grad_entropy, v0, inv_temp, bias, dz_scale, block, num_warps
    )
