"""Forward row pass: fold one tile of raw logits into each token's running softmax statistics.

Per row (one program each), one read of the slab: ``z = logits / tau + b`` block by block into per-lane
running ``(max, sum exp(z - max), sum exp(z - max) (z - max))`` (online softmax: a lane's sums are rescaled
when its max grows), then the lanes are merged into the slab's numbers and those into the row's running
``(max, sum_exp, sum_ez, target_logit)`` state, ``sum_ez`` always relative to the running max so an entropy
near 0 does not cancel. One read per logit whatever the slab width, so the one-pass sweep folds a chunk's
whole vocabulary in one launch without relying on L2 for a second read. Columns past the slab stay ``-inf``
in the max (never 0: a 0 would win the max of all-negative logits) and out of the sums.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import eager_or_op, on_device_of
from .scaled_logits import scaled_logits
from .types import TL_DTYPES


@triton.jit
def _logprob_fold_kernel(
    logits_ptr,
    stride_row,
    n_cols,
    state_ptr,
    stride_state,
    targets_ptr,
    stride_t,
    v0,
    inv_temp_ptr,
    bias_ptr,
    stride_b,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_logits = logits_ptr + row * stride_row
    inv_temp = tl.load(inv_temp_ptr)  # from memory: a scalar argument would be rounded to float32
    target_col = tl.load(targets_ptr + row * stride_t) - v0

    lane_max = tl.full((BLOCK,), float("-inf"), ACC)
    lane_sum = tl.zeros((BLOCK,), ACC)  # sum exp(z - lane_max)
    lane_ez = tl.zeros((BLOCK,), ACC)  # sum exp(z - lane_max) (z - lane_max)
    target_hits = tl.zeros((BLOCK,), ACC)
    for c0 in range(0, n_cols, BLOCK):
        cols, ok, z = scaled_logits(row_logits, bias_ptr, stride_b, c0, n_cols, inv_temp, HAS_BIAS, BLOCK, ACC)
        target_hits += tl.where(cols == target_col, z, 0.0)
        new_max = tl.maximum(lane_max, tl.where(ok, z, float("-inf")))
        live = new_max > float("-inf")  # lanes past a slab narrower than BLOCK never are
        # shift of the old sums (-inf - -inf would be NaN: a lane with no column yet has nothing to shift)
        grown = tl.where(lane_max > float("-inf"), lane_max - new_max, 0.0)
        rescale = tl.exp(grown)
        shifted = tl.where(ok, z - tl.where(live, new_max, 0.0), 0.0)
        e = tl.where(ok, tl.exp(shifted), 0.0)
        lane_ez = rescale * (lane_ez + grown * lane_sum) + e * shifted
        lane_sum = rescale * lane_sum + e
        lane_max = new_max
    slab_max = tl.max(lane_max, 0)  # finite: a slab has at least one column
    lane_shift = tl.where(lane_max > float("-inf"), lane_max - slab_max, 0.0)
    lane_scale = tl.where(lane_max > float("-inf"), tl.exp(lane_shift), 0.0)
    slab_sum = tl.sum(lane_scale * lane_sum, 0)
    slab_ez = tl.sum(lane_scale * (lane_ez + lane_shift * lane_sum), 0)

    run_max = tl.load(state_ptr + row)
    sum_exp = tl.load(state_ptr + stride_state + row)
    sum_ez = tl.load(state_ptr + 2 * stride_state + row)
    new_max = tl.maximum(run_max, slab_max)
    old_scale = tl.exp(run_max - new_max)
    slab_scale = tl.exp(slab_max - new_max)
    # (run_max - new_max) * sum_exp is -inf * 0 before the first slab
    old_ez = tl.where(sum_exp > 0, sum_ez + (run_max - new_max) * sum_exp, 0.0)
    tl.store(state_ptr + row, new_max)
    tl.store(state_ptr + stride_state + row, old_scale * sum_exp + slab_scale * slab_sum)
    tl.store(
        state_ptr + 2 * stride_state + row,
        old_scale * old_ez + slab_scale * (slab_ez + (slab_max - new_max) * slab_sum),
    )
    in_slab = (target_col >= 0) & (target_col < n_cols)
    target_ptr = state_ptr + 3 * stride_state + row
    tl.store(target_ptr, tl.where(in_slab, tl.sum(target_hits, 0), tl.load(target_ptr)))


def launch_logprob_fold(
    logits: torch.Tensor,
    state: torch.Tensor,
    targets: torch.Tensor,
    v0: int,
    inv_temp: torch.Tensor,
    bias: Optional[torch.Tensor],
    block: int,
    num_warps: int,
) -> None:
    """``logits`` ``(rows, cols)`` with unit column stride; ``state`` ``(4, rows)``; ``targets`` ``(rows,)``."""
    rows, cols = logits.shape
    if rows == 0:
        return
    with on_device_of(logits):
        _logprob_fold_kernel[(rows,)](
            logits,
            logits.stride(0),
            cols,
            state,
            state.stride(0),
            targets,
            targets.stride(0),
            v0,
            inv_temp,
            bias,
            0 if bias is None else bias.stride(0),
            HAS_BIAS=bias is not None,
            BLOCK=block,
            ACC=TL_DTYPES[logits.dtype],
            num_warps=num_warps,
        )


logprob_fold_op = torch.library.custom_op("apo_kernels::logprob_fold", launch_logprob_fold, mutates_args=("state",))


@logprob_fold_op.register_fake
def _(logits, state, targets, v0, inv_temp, bias, block, num_warps) -> None:
    return None


def logprob_fold(logits, state, targets, v0, inv_temp, bias, block, num_warps) -> None:
    """Fold ``logits`` into ``state`` (see :func:`launch_logprob_fold`), launched as ``launch.eager_or_op`` says."""
    eager_or_op(logprob_fold_op, launch_logprob_fold, logits)(
        logits, state, targets, v0, inv_temp, bias, block, num_warps
    )
