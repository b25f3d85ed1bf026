"""Forward kernel: per-token log-sum-exp, target log-prob and entropy, streaming the vocabulary."""

import torch
import triton
import triton.language as tl

from .tiles import logit_tile
from .tuning import TL_DTYPES, TileConfig


@triton.jit
def _logprobs_fwd_kernel(
    h_ptr, stride_hn, stride_hd, w_ptr, stride_wv, stride_wd, b_ptr, stride_b, tgt_ptr, stride_t,
    logp_ptr, ent_ptr, stats_ptr, N, V, D, inv_temp_ptr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT: tl.constexpr, ACC: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(tgt_ptr + rows * stride_t, mask=row_ok, other=0)
    run_max = tl.full((BLOCK_N,), float("-inf"), ACC)
    sum_exp = tl.zeros((BLOCK_N,), ACC)
    # sum_j e_j (z_j - run_max), kept relative to the running max so an entropy near 0 does not cancel
    sum_ez = tl.zeros((BLOCK_N,), ACC)
    target_logit = tl.zeros((BLOCK_N,), ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = logit_tile(
            h_ptr, stride_hn, stride_hd, w_ptr, stride_wv, stride_wd, b_ptr, stride_b,
            rows, row_ok, cols, col_ok, D, inv_temp_ptr, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT, ACC,
        )
        new_max = tl.maximum(run_max, tl.max(z, 1))  # finite: every tile has a valid column
        rescale = tl.exp(run_max - new_max)
        shifted = z - new_max[:, None]
        e = tl.exp(shifted)
        # (run_max - new_max) * sum_exp is -inf * 0 on the first tile: guard it like the torch backend
        shift_term = tl.where(sum_exp > 0, (run_max - new_max) * sum_exp, 0.0)
        tile_ez = tl.sum(tl.where(col_ok[None, :], e * shifted, 0.0), 1)
        sum_ez = rescale * (sum_ez + shift_term) + tile_ez
        sum_exp = rescale * sum_exp + tl.sum(e, 1)
        run_max = new_max
        target_logit += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
    # m and log sum exp(z - m) stay apart (not one lse): with logits near +-100 a float32 lse loses ~1e-5
    log_sum = tl.log(sum_exp)
    mean_shifted = sum_ez / sum_exp  # E[z] - m
    tl.store(logp_ptr + rows, (target_logit - run_max) - log_sum, mask=row_ok)
    tl.store(ent_ptr + rows, log_sum - mean_shifted, mask=row_ok)  # H = log sum exp(z) - E[z]
    tl.store(stats_ptr + rows, run_max, mask=row_ok)
    tl.store(stats_ptr + N + rows, log_sum, mask=row_ok)
    tl.store(stats_ptr + 2 * N + rows, mean_shifted, mask=row_ok)


def logprobs_forward(hidden, weight, targets, bias, inv_temp, *, acc, dot, tiles: TileConfig):
    """``(logp, entropy, stats)`` in ``acc``: the ``(N,)`` outputs and, for backward, the ``(3, N)`` rows
    ``(m, log sum exp(z - m), E[z] - m)`` with ``m`` the row max (no output is saved, so callers may edit
    them). ``inv_temp`` is a one-element ``acc`` tensor holding ``1 / temperature``."""
    n_tokens, hidden_size = hidden.shape
    logp = torch.empty(n_tokens, dtype=acc, device=hidden.device)
    entropy = torch.empty_like(logp)
    stats = torch.empty((3, n_tokens), dtype=acc, device=hidden.device)
    if n_tokens == 0:
        return logp, entropy, stats
    _logprobs_fwd_kernel[(triton.cdiv(n_tokens, tiles.block_n),)](
        hidden, *hidden.stride(), weight, *weight.stride(),
        bias, 0 if bias is None else bias.stride(0), targets, targets.stride(0),
        logp, entropy, stats, n_tokens, weight.shape[0], hidden_size, inv_temp,
        HAS_BIAS=bias is not None, BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d,
        DOT=TL_DTYPES[dot], ACC=TL_DTYPES[acc], num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return logp, entropy, stats
