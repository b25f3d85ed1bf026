"""The per-token APO objective on ``(B, T)`` tensors: the one place the loss formula lives.

Every backend (the chunked torch path, the Triton kernels, the materialized-logits reference) produces
per-token log-probs and entropies and hands them to :func:`apo_objective`. The loss is written as

    loss = sum(w_pg * pg) + sum(w_kl * k) - entropy_coef * sum(w_pg * H)

with per-token weights ``w_pg`` (aggregation of the policy term) and ``w_kl`` (``beta * lambda_i`` times
the KL aggregation), so an aggregation mode is nothing but a weight tensor, and a fused epilogue only
has to evaluate the elementwise terms (see ``kernels/apo_epilogue.py``, tested against
:func:`torch_epilogue`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .config import APOConfig

Number = Union[int, float, torch.Tensor]


def aggregation_weights(
    mask: torch.Tensor,
    mode: str,
    *,
    num_tokens: Optional[Number] = None,
    num_sequences: Optional[Number] = None,
    norm_len: Optional[int] = None,
) -> torch.Tensor:
    """``(B, T)`` weights ``w`` such that aggregating ``x`` under ``mode`` is ``(w * x).sum()``.

    ``mask`` is a float ``(B, T)`` 0/1 tensor. ``num_tokens`` replaces the token-mean denominator (a
    global token count, DAPO-style); ``num_sequences`` replaces the sequence count ``B`` of the seq-mean
    modes (verl passes its global batch size); ``norm_len`` is ``T_norm`` of seq-mean-token-sum-norm
    (default: the padded length ``T``).
    """
    batch, length = mask.shape
    if mode == "token-mean":
        denom = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
        return mask / denom
    seqs = batch if num_sequences is None else num_sequences
    if mode == "seq-mean-token-mean":
        return mask / (mask.sum(-1, keepdim=True).clamp(min=1) * seqs)
    if mode == "seq-mean-token-sum":
        return mask / seqs
    if mode == "seq-mean-token-sum-norm":
        return mask / (seqs * (length if norm_len is None else norm_len))
    raise ValueError(f"unknown aggregation mode {mode!r}")


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from ``delta = ref_logp - logp`` (unclamped)."""
    delta = ref_logps - logps
    if estimator == "k1":
        return -delta
    if estimator == "k2":
        return 0.5 * delta * delta
    return torch.exp(delta) - delta - 1.0


def policy_term(ratio: torch.Tensor, advantages: torch.Tensor, config: APOConfig) -> torch.Tensor:
    """Clipped surrogate ``-min(rho A, clip(rho) A)``, with verl's dual clip for ``A < 0`` when configured."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - config.eps_low, 1.0 + config.eps_high)
    pg = torch.maximum(unclipped, clipped)
    if config.clip_ratio_c is not None:
        pg = torch.where(advantages < 0, torch.minimum(pg, -advantages * config.clip_ratio_c), pg)
    return pg


@dataclass(frozen=True)
class EpilogueOutput:
    """What an epilogue returns: the differentiable loss and detached per-token terms for the metrics."""

    loss: torch.Tensor
    pg: torch.Tensor
    kl: torch.Tensor
    ratio: torch.Tensor


def torch_epilogue(
    logps: torch.Tensor,
    entropy: Optional[torch.Tensor],
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    advantages: torch.Tensor,
    w_pg: torch.Tensor,
    w_kl: torch.Tensor,
    config: APOConfig,
) -> EpilogueOutput:
    """Elementwise APO terms and their weighted sum, differentiated by autograd.

    All tensors are ``(B, T)`` of one float dtype; ``old_logps`` and ``ref_logps`` are detached and equal
    to ``logps`` at masked positions, so every term is finite there and its zero weight removes it.
    """
    ratio = torch.exp(logps - old_logps)
    pg = policy_term(ratio, advantages, config)
    kl = kl_penalty(logps, ref_logps, config.kl_estimator)
    loss = (w_pg * pg).sum() + (w_kl * kl).sum()
    if config.entropy_coef != 0 and entropy is not None:
        loss = loss - config.entropy_coef * (w_pg * entropy).sum()
    return EpilogueOutput(loss=loss, pg=pg.detach(), kl=kl.detach(), ratio=ratio.detach())


Epilogue = Callable[..., EpilogueOutput]


def apo_objective(
    logps: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    entropy: Optional[torch.Tensor] = None,
    kl_weights: Optional[torch.Tensor] = None,
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    config: APOConfig = APOConfig(),
    num_tokens: Optional[Number] = None,
    num_sequences: Optional[Number] = None,
    epilogue: Epilogue = torch_epilogue,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """APO loss and metrics from per-token log-probs.

    Args:
        logps: ``(B, T)`` log-probs of the sampled tokens (with gradient), float32 or float64.
        mask: ``(B, T)`` response mask (bool or 0/1).
        advantages: ``(B,)`` or ``(B, T)`` advantages (STCR already applied by the group stage).
        entropy: ``(B, T)`` entropies (with gradient when ``config.entropy_coef != 0``), or None.
        kl_weights: ``(B,)`` or ``(B, T)`` DADS weights ``lambda``; None means 1.
        old_logps: ``(B, T)`` behaviour-policy log-probs; None means ``logps.detach()`` (ratio 1).
        ref_logps: ``(B, T)`` reference log-probs; None is only valid when ``config.beta == 0``.
        num_tokens, num_sequences: global normalizers, see :func:`aggregation_weights`.
        epilogue: evaluates the elementwise terms (:func:`torch_epilogue` or the fused Triton one).

    Returns:
        ``(loss, metrics)``: the scalar loss and a dict of detached scalar tensors.
    """
    dtype = logps.dtype
    shape = logps.shape
    valid = mask.bool()
    m = valid.to(dtype)
    detached = logps.detach()

    def per_token(x: Optional[torch.Tensor], default: Optional[torch.Tensor]) -> torch.Tensor:
        if x is None:
            return default
        x = x.detach().to(dtype)
        return (x.unsqueeze(-1) if x.dim() == 1 else x).expand(shape)

    def on_mask(x: Optional[torch.Tensor]) -> torch.Tensor:
        # Masked positions may hold padding values (0, -inf, NaN): replace them by logp so the terms stay finite.
        return detached if x is None else torch.where(valid, x.detach().to(dtype), detached)

    adv = per_token(advantages, None)
    lam = per_token(kl_weights, torch.ones_like(detached))
    w_pg = aggregation_weights(
        m, config.loss_agg_mode, num_tokens=num_tokens, num_sequences=num_sequences, norm_len=config.loss_agg_norm
    )
    w_kl = aggregation_weights(
        m, config.kl_agg_mode, num_tokens=num_tokens, num_sequences=num_sequences, norm_len=config.loss_agg_norm
    ) * (config.beta * lam)
    out = epilogue(logps, entropy, on_mask(old_logps), on_mask(ref_logps), adv, w_pg, w_kl, config)

    n_valid = m.sum().clamp(min=1)
    token_mean = lambda x: (m * x).sum() / n_valid  # noqa: E731  (metrics: plain mean over valid tokens)
    metrics = {
        "pg_loss": (w_pg * out.pg).sum(),
        "kl": token_mean(out.kl),
        "entropy": token_mean(entropy.detach()) if entropy is not None else torch.zeros((), dtype=dtype),
        "clip_frac_low": token_mean(((out.ratio < 1.0 - config.eps_low) & (adv < 0)).to(dtype)),
        "clip_frac_high": token_mean(((out.ratio > 1.0 + config.eps_high) & (adv > 0)).to(dtype)),
        "ratio_mean": token_mean(out.ratio),
        "kl_weight_mean": token_mean(lam),
    }
    if config.clip_ratio_c is not None:
        metrics["clip_frac_dual"] = token_mean(((out.ratio > config.clip_ratio_c) & (adv < 0)).to(dtype))
    return out.loss, {k: v.detach() for k, v in metrics.items()}
