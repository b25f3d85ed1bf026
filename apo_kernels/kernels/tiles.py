"""Tile helpers shared by the LM-head kernels: one logit tile, and the logit gradient of one tile."""

import triton
import triton.language as tl


@triton.jit
def logit_tile(
    h_ptr, stride_hn, stride_hd, w_ptr, stride_wv, stride_wd, b_ptr, stride_b,
    rows, row_ok, cols, col_ok, D, inv_temp_ptr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT: tl.constexpr, ACC: tl.constexpr,
):
    """``z = h @ W.T / tau + b`` for ``rows`` x ``cols`` in ``ACC``; columns past the vocabulary are -inf
    (never 0: a 0 would win the max of all-negative logits and enter the softmax)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), ACC)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hn
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wv
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        h = tl.load(h_rows + ds[None, :] * stride_hd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_rows + ds[None, :] * stride_wd, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(h.to(DOT), tl.trans(w.to(DOT)), acc, input_precision="ieee", out_dtype=ACC)
    # 1 / tau is read from memory: a scalar argument would be rounded to float32 even for float64 inputs
    z = acc * tl.load(inv_temp_ptr)  # bias after the temperature division: z = h W^T / tau + b
    if HAS_BIAS:
        z += tl.load(b_ptr + cols * stride_b, mask=col_ok, other=0.0).to(ACC)[None, :]
    return tl.where(col_ok[None, :], z, float("-inf"))


@triton.jit
def row_statistics(stats_ptr, N, rows, row_ok):
    """The forward's saved ``(3, N)`` statistics of ``rows``: ``m``, ``log sum exp(z - m)``, ``E[z] - m``."""
    row_max = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
    log_sum = tl.load(stats_ptr + N + rows, mask=row_ok, other=0.0)
    mean_shifted = tl.load(stats_ptr + 2 * N + rows, mask=row_ok, other=0.0)
    return row_max, log_sum, mean_shifted


@triton.jit
def logit_grad_tile(
    z, rows, row_ok, cols, col_ok, tgt, row_max, log_sum, mean_shifted, g_logp_ptr, stride_gl, g_ent_ptr,
    stride_ge, HAS_G_LOGP: tl.constexpr, HAS_G_ENT: tl.constexpr, ACC: tl.constexpr,
):
    """``dL/dz = g_logp (onehot - p) - g_H p (z - E[z])`` of one tile from the saved row statistics
    (``m``, ``log sum exp(z - m)``, ``E[z] - m``); 0 outside the valid rows and columns. Not yet
    divided by tau."""
    shifted = z - row_max[:, None]
    # (z - m) - log_sum subtracts numbers of similar size, as torch.log_softmax does
    p = tl.exp(shifted - log_sum[:, None])
    dz = tl.zeros(z.shape, ACC)
    if HAS_G_LOGP:
        g = tl.load(g_logp_ptr + rows.to(tl.int64) * stride_gl, mask=row_ok, other=0.0).to(ACC)
        onehot = (cols[None, :] == tgt[:, None]).to(ACC)
        dz += g[:, None] * (onehot - p)
    if HAS_G_ENT:
        g_h = tl.load(g_ent_ptr + rows.to(tl.int64) * stride_ge, mask=row_ok, other=0.0).to(ACC)
        dz -= g_h[:, None] * p * (shifted - mean_shifted[:, None])
    # Padded columns have p = 0 and z = -inf: 0 * -inf is NaN, so they are zeroed explicitly.
    return tl.where(row_ok[:, None] & col_ok[None, :], dz, 0.0)
