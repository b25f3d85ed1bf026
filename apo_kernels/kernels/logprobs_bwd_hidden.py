"""Backward kernel for ``d_hidden``: one program per token block, streaming the vocabulary.

Each program owns its rows of the float32 accumulator, so no atomics are needed and the result does
not depend on scheduling. Per vocabulary tile it recomputes the logits, forms ``dz`` and adds
``dz @ W_tile`` slice by slice of the hidden size. With 16-bit operands ``dz`` enters that matmul as a
hi + lo pair of 16-bit tensors (two tensor-core matmuls), see the kernel.
"""

import triton
import triton.language as tl

from .tiles import logit_grad_tile, logit_tile, row_statistics
from .tuning import TL_DTYPES, TileConfig


@triton.jit
def _logprobs_bwd_hidden_kernel(
    h_ptr, stride_hn, stride_hd, w_ptr, stride_wv, stride_wd, b_ptr, stride_b, tgt_ptr, stride_t,
    stats_ptr, N, g_logp_ptr, stride_gl, g_ent_ptr, stride_ge, dh_ptr, stride_dn, stride_dd,
    row_start, row_end, V, D, inv_temp_ptr,
    HAS_BIAS: tl.constexpr, HAS_G_LOGP: tl.constexpr, HAS_G_ENT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    OPERAND: tl.constexpr, SPLIT_DZ: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
):
    rows = row_start + tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    tgt = tl.load(tgt_ptr + rows * stride_t, mask=row_ok, other=0)
    row_max, log_sum, mean_shifted = row_statistics(stats_ptr, N, rows, row_ok)
    inv_temp = tl.load(inv_temp_ptr)
    dh_rows = dh_ptr + (rows - row_start)[:, None] * stride_dn
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = logit_tile(
            h_ptr, stride_hn, stride_hd, w_ptr, stride_wv, stride_wd, b_ptr, stride_b,
            rows, row_ok, cols, col_ok, D, inv_temp_ptr, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT, ACC,
        )
        dz = logit_grad_tile(
            z, rows, row_ok, cols, col_ok, tgt, row_max, log_sum, mean_shifted,
            g_logp_ptr, stride_gl, g_ent_ptr, stride_ge,
            HAS_G_LOGP, HAS_G_ENT, ACC,
        )
        dz = dz * inv_temp
        dz_hi = dz.to(OPERAND)
        if SPLIT_DZ:
            # dh = sum_v dz_v W_v cancels (sum_v dz_v = 0): dz rounded to 8 bits would leave ~2^-9 |W| of
            # noise wherever W has a common component, so its rounding error rides along as a second operand.
            dz_lo = (dz - dz_hi.to(ACC)).to(OPERAND).to(DOT)
        dz_hi = dz_hi.to(DOT)
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wv
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            w = tl.load(w_rows + ds[None, :] * stride_wd, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            w = w.to(DOT)
            part = tl.dot(dz_hi, w, input_precision="ieee", out_dtype=ACC)
            if SPLIT_DZ:
                part = tl.dot(dz_lo, w, part, input_precision="ieee", out_dtype=ACC)
            dh = dh_rows + ds[None, :] * stride_dd
            here = row_ok[:, None] & d_ok[None, :]
            tl.store(dh, tl.load(dh, mask=here, other=0.0) + part, mask=here)


def hidden_grad_rows(
    d_hidden, row_start, row_end, hidden, weight, targets, bias, stats, grad_logp, grad_entropy, inv_temp,
    *, operand, dot, tiles: TileConfig,
):
    """Add ``dL/dhidden`` of rows ``[row_start, row_end)`` into the zeroed accumulator ``d_hidden``
    (``(row_end - row_start, D)``, accumulation dtype)."""
    acc = stats.dtype
    _logprobs_bwd_hidden_kernel[(triton.cdiv(row_end - row_start, tiles.block_n),)](
        hidden, *hidden.stride(), weight, *weight.stride(),
        bias, 0 if bias is None else bias.stride(0), targets, targets.stride(0), stats, hidden.shape[0],
        grad_logp, 0 if grad_logp is None else grad_logp.stride(0),
        grad_entropy, 0 if grad_entropy is None else grad_entropy.stride(0),
        d_hidden, *d_hidden.stride(), row_start, row_end, weight.shape[0], hidden.shape[1], inv_temp,
        HAS_BIAS=bias is not None, HAS_G_LOGP=grad_logp is not None, HAS_G_ENT=grad_entropy is not None,
        BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d,
        OPERAND=TL_DTYPES[operand], SPLIT_DZ=operand != acc, DOT=TL_DTYPES[dot], ACC=TL_DTYPES[acc],
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
