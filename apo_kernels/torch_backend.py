"""Chunked PyTorch backend: log-probs and entropies of ``softmax(h W^T / tau + b)`` without full logits.

The forward streams the vocabulary in chunks of ``vocab_chunk`` columns for ``token_chunk`` tokens at a
time with an online log-sum-exp, and keeps only three numbers per token for backward: the row max ``m``,
``log sum exp(z - m)`` and the mean shifted logit ``E[z] - m`` (none of them an output, so callers may
edit the outputs in place). Keeping ``m`` apart from the log-sum (rather than one ``lse``)
lets ``log p = (z - m) - log_sum`` subtract numbers of similar size, as ``torch.log_softmax`` does; with
logits near +-100 a single float32 ``lse`` would lose ~1e-5 absolute. The backward recomputes each logit tile, so the ``N x V`` logits never exist.

Memory bound, beyond the inputs and their gradients: a few ``token_chunk x vocab_chunk`` tiles in the
compute dtype (with the defaults, 2048 x 4096 float32 = 32 MiB each; about 4 live at once), a float32
accumulator for ``d_hidden`` (``N x D``) and one for a ``vocab_chunk x D`` slice of ``d_weight``.
bf16/fp16 inputs are upcast tile by tile *before* the matmul, so logits are never rounded to 16 bits.
Float64 inputs compute in float64 (the oracle's precision).
"""

from __future__ import annotations

from typing import Optional

import torch

TOKEN_CHUNK = 2048
VOCAB_CHUNK = 4096


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32: the accumulation dtype of every backend."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _logit_tile(h, w, b, inv_temp, acc):
    """Logits ``h @ w.T / tau + b`` of one vocabulary chunk ``w`` (bias chunk ``b``) in ``acc``; ``h`` is in ``acc``."""
    z = (h @ w.to(acc).T) * inv_temp
    return z if b is None else z + b.to(acc)


def _target_columns(targets, v0, v1):
    """Which targets fall in vocabulary chunk ``[v0, v1)``, and their (clamped) columns in it."""
    return (targets >= v0) & (targets < v1), (targets - v0).clamp(0, v1 - v0 - 1)[:, None]


class ChunkedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, token_chunk, vocab_chunk):
        acc = compute_dtype(hidden, weight, bias)
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        inv_temp = 1.0 / temperature
        row_max = torch.empty(n_tokens, dtype=acc, device=hidden.device)
        log_sum = torch.empty_like(row_max)
        mean_shifted = torch.empty_like(row_max)
        logp = torch.empty_like(row_max)
        for n0 in range(0, n_tokens, token_chunk):
            h = hidden[n0 : n0 + token_chunk].to(acc)
            tgt = targets[n0 : n0 + token_chunk]
            rows = h.shape[0]
            run_max = torch.full((rows,), float("-inf"), dtype=acc, device=h.device)
            sum_exp = torch.zeros(rows, dtype=acc, device=h.device)
            # sum_j e_j (z_j - run_max): kept relative to the running max so the entropy avoids cancellation
            sum_ez = torch.zeros(rows, dtype=acc, device=h.device)
            target_logit = torch.zeros(rows, dtype=acc, device=h.device)
            for v0 in range(0, vocab, vocab_chunk):
                v1 = min(v0 + vocab_chunk, vocab)
                z = _logit_tile(h, weight[v0:v1], None if bias is None else bias[v0:v1], inv_temp, acc)
                new_max = torch.maximum(run_max, z.amax(-1))
                rescale = torch.exp(run_max - new_max)
                shifted = z - new_max[:, None]
                e = torch.exp(shifted)
                shift_term = torch.where(sum_exp > 0, (run_max - new_max) * sum_exp, torch.zeros_like(sum_exp))
                sum_ez = rescale * (sum_ez + shift_term) + (e * shifted).sum(-1)
                sum_exp = rescale * sum_exp + e.sum(-1)
                run_max = new_max
                here, cols = _target_columns(tgt, v0, v1)
                picked = z.gather(1, cols).squeeze(1)
                target_logit = torch.where(here, picked, target_logit)
            chunk_log_sum = torch.log(sum_exp)
            row_max[n0 : n0 + rows] = run_max
            log_sum[n0 : n0 + rows] = chunk_log_sum
            logp[n0 : n0 + rows] = (target_logit - run_max) - chunk_log_sum
            mean_shifted[n0 : n0 + rows] = sum_ez / sum_exp
        ctx.save_for_backward(hidden, weight, bias, targets, row_max, log_sum, mean_shifted)
        ctx.temperature = temperature
        ctx.chunks = (token_chunk, vocab_chunk)
        ctx.set_materialize_grads(False)
        return logp, log_sum - mean_shifted  # H = log sum exp(z) - E[z]

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, row_max, log_sum, mean_shifted = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None, None
        token_chunk, vocab_chunk = ctx.chunks
        acc = row_max.dtype
        inv_temp = 1.0 / ctx.temperature
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        d_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
        d_weight = torch.empty_like(weight) if need_w else None
        d_bias = torch.zeros(vocab, dtype=acc, device=hidden.device) if need_b else None
        for v0 in range(0, vocab, vocab_chunk):
            v1 = min(v0 + vocab_chunk, vocab)
            w = weight[v0:v1].to(acc)
            d_w = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
            b = None if bias is None else bias[v0:v1]
            for n0 in range(0, n_tokens, token_chunk):
                n1 = min(n0 + token_chunk, n_tokens)
                h = hidden[n0:n1].to(acc)
                shifted = _logit_tile(h, w, b, inv_temp, acc) - row_max[n0:n1, None]
                p = torch.exp(shifted - log_sum[n0:n1, None])
                # dL/dz = g_logp (onehot - p) - g_H p (z - E[z])
                dz = torch.zeros_like(p)
                if grad_logp is not None:
                    g = grad_logp[n0:n1].to(acc)
                    dz -= g[:, None] * p
                    here, cols = _target_columns(targets[n0:n1], v0, v1)
                    dz.scatter_add_(1, cols, torch.where(here, g, torch.zeros_like(g))[:, None])
                if grad_entropy is not None:
                    g_h = grad_entropy[n0:n1].to(acc)
                    dz -= g_h[:, None] * p * (shifted - mean_shifted[n0:n1, None])
                if need_b:
                    d_bias[v0:v1] += dz.sum(0)
                dz *= inv_temp
                if need_h:
                    d_hidden[n0:n1] += dz @ w
                if need_w:
                    d_w += dz.T @ h
            if need_w:
                d_weight[v0:v1] = d_w.to(weight.dtype)
        return (
            d_hidden.to(hidden.dtype) if need_h else None,
            d_weight,
            d_bias.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
            None,
        )


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    *,
    token_chunk: int = TOKEN_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N,)`` log-probs and entropies of ``targets`` under ``softmax(hidden @ weight.T / temperature + bias)``.

    Inputs are assumed validated (see ``logprobs.fused_linear_logprobs``). Outputs are float32, or
    float64 when an input is float64.
    """
    return ChunkedLinearLogprobs.apply(hidden, weight, bias, targets, temperature, token_chunk, vocab_chunk)
