"""Backward kernel for ``d_weight`` and ``d_bias``: one program per vocabulary block, streaming the tokens.

The transpose of ``logprobs_bwd_hidden``: each program owns its rows of the float32 ``d_weight``
accumulator (and its slice of ``d_bias``), recomputes the logits of every token tile and adds
``dz.T @ h_tile``. ``COMPUTE_DW=False`` (frozen or LoRA head) keeps only the ``d_bias`` sums.
"""

import triton
import triton.language as tl

from .tiles import logit_grad_tile, logit_tile, row_statistics
from .tuning import TL_DTYPES, TileConfig


@triton.jit
def _logprobs_bwd_weight_kernel(
    h_ptr, stride_hn, stride_hd, w_ptr, stride_wv, stride_wd, b_ptr, stride_b, tgt_ptr, stride_t,
    stats_ptr, N, g_logp_ptr, stride_gl, g_ent_ptr, stride_ge, dw_ptr, stride_dv, stride_dd, db_ptr,
    col_start, col_end, D, inv_temp_ptr,
    HAS_BIAS: tl.constexpr, HAS_G_LOGP: tl.constexpr, HAS_G_ENT: tl.constexpr,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    OPERAND: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
):
    cols = col_start + tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < col_end
    inv_temp = tl.load(inv_temp_ptr)
    d_bias = tl.zeros((BLOCK_V,), ACC)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < N
        tgt = tl.load(tgt_ptr + rows * stride_t, mask=row_ok, other=0)
        row_max, log_sum, mean_shifted = row_statistics(stats_ptr, N, rows, row_ok)
        z = logit_tile(
            h_ptr, stride_hn, stride_hd, w_ptr, stride_wv, stride_wd, b_ptr, stride_b,
            rows, row_ok, cols, col_ok, D, inv_temp_ptr, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT, ACC,
        )
        dz = logit_grad_tile(
            z, rows, row_ok, cols, col_ok, tgt, row_max, log_sum, mean_shifted,
            g_logp_ptr, stride_gl, g_ent_ptr, stride_ge,
            HAS_G_LOGP, HAS_G_ENT, ACC,
        )
        if COMPUTE_DB:
            d_bias += tl.sum(dz, 0)  # the bias is added after the temperature division: no 1 / tau
        if COMPUTE_DW:
            dz_t = tl.trans((dz * inv_temp).to(OPERAND).to(DOT))
            h_rows = h_ptr + rows[:, None] * stride_hn
            dw_rows = dw_ptr + (cols - col_start).to(tl.int64)[:, None] * stride_dv
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                d_ok = ds < D
                h = tl.load(h_rows + ds[None, :] * stride_hd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                part = tl.dot(dz_t, h.to(DOT), input_precision="ieee", out_dtype=ACC)
                dw = dw_rows + ds[None, :] * stride_dd
                here = col_ok[:, None] & d_ok[None, :]
                tl.store(dw, tl.load(dw, mask=here, other=0.0) + part, mask=here)
    if COMPUTE_DB:
        tl.store(db_ptr + cols, d_bias, mask=col_ok)


def weight_grad_rows(
    d_weight, d_bias, col_start, col_end, hidden, weight, targets, bias, stats, grad_logp, grad_entropy, inv_temp,
    *, operand, dot, tiles: TileConfig,
):
    """Add ``dL/dweight`` of vocabulary rows ``[col_start, col_end)`` into the zeroed accumulator
    ``d_weight`` (``(col_end - col_start, D)``) and write those entries of ``d_bias`` (``(V,)``); either
    may be None. Both are in the accumulation dtype."""
    acc = stats.dtype
    _logprobs_bwd_weight_kernel[(triton.cdiv(col_end - col_start, tiles.block_v),)](
        hidden, *hidden.stride(), weight, *weight.stride(),
        bias, 0 if bias is None else bias.stride(0), targets, targets.stride(0), stats, hidden.shape[0],
        grad_logp, 0 if grad_logp is None else grad_logp.stride(0),
        grad_entropy, 0 if grad_entropy is None else grad_entropy.stride(0),
        d_weight, *((0, 0) if d_weight is None else d_weight.stride()), d_bias,
        col_start, col_end, hidden.shape[1], inv_temp,
        HAS_BIAS=bias is not None, HAS_G_LOGP=grad_logp is not None, HAS_G_ENT=grad_entropy is not None,
        COMPUTE_DW=d_weight is not None, COMPUTE_DB=d_bias is not None,
        BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d,
        OPERAND=TL_DTYPES[operand], DOT=TL_DTYPES[dot], ACC=TL_DTYPES[acc],
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
