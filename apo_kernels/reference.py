"""Materialized-logits oracle: the loss and log-prob functions written plainly, differentiated by autograd.

This is what a naive trainer does (``N x V`` logits in memory); the tests compare every fast path
against it, in float64 where useful. Inputs are upcast *before* the matmul (float32, or float64 when
any input is float64), never rounded to 16 bits after it.
"""

from __future__ import annotations

from typing import Optional

import torch

from .config import APOConfig
from .inputs import Number, compute_dtype, dtype_of, head_inputs, loss_inputs
from .objective import APOOutput, evaluate, token_terms


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Same contract as :func:`apo_kernels.fused_linear_logprobs`, with full logits."""
    head_inputs(
        hidden,
        weight,
        targets,
        mask=None,
        bias=bias,
        temperature=temperature,
        backend="torch",
        workspace_bytes=None,
        vocab_parallel_group=None,
    )
    acc = compute_dtype(hidden.dtype, weight.dtype, dtype_of(bias))
    logits = hidden.to(acc) @ weight.to(acc).T / temperature
    if bias is not None:
        logits = logits + bias.to(acc)
    log_probs = torch.log_softmax(logits, dim=-1)
    logps = log_probs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logps, None
    return logps, -(log_probs.exp() * log_probs).sum(-1)


def apo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    kl_weights: Optional[torch.Tensor] = None,
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    sampling_logps: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    num_tokens: Optional[Number] = None,
    num_sequences: Optional[Number] = None,
    config: APOConfig = APOConfig(),
    entropy_quantile_group=None,
) -> APOOutput:
    """Same contract as :func:`apo_kernels.apo_loss`, with full logits over every position."""
    inputs = loss_inputs(
        hidden,
        weight,
        targets,
        mask,
        advantages,
        kl_weights=kl_weights,
        old_logps=old_logps,
        ref_logps=ref_logps,
        sampling_logps=sampling_logps,
        bias=bias,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        config=config,
        entropy_quantile_group=entropy_quantile_group,
    )
    valid = inputs.objective.mask
    flat_valid = valid.reshape(-1)
    safe_targets = torch.where(flat_valid, inputs.head.targets, torch.zeros_like(inputs.head.targets))
    logps, entropy = linear_logprobs(
        inputs.head.hidden, weight, safe_targets, bias=bias, temperature=config.temperature, return_entropy=True
    )
    m = flat_valid.to(logps.dtype)
    logps, entropy = logps * m, entropy * m
    loss, metrics = evaluate(
        token_terms(inputs.objective, logps.dtype), logps.view(valid.shape), entropy.view(valid.shape)
    )
    return APOOutput.of(loss, logps, entropy, metrics, None, inputs.head.out_shape)
