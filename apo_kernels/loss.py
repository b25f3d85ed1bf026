"""``apo_loss``: the APO loss straight from hidden states and the LM head.

The call runs the stages in order, each in its own module: inputs (validate once), plan (backend, rows, one
pass or two, tile), the objective's per-token terms, the driver's sweep, the objective's value and metrics.
"""

from __future__ import annotations

from typing import Optional

import torch

from .config import APOConfig
from . import driver
from .inputs import Number, loss_inputs
from .objective import APOOutput, evaluate, token_terms
from .plan import plan_loss


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
    backend: str = "auto",
    workspace_bytes: Optional[int] = None,
    sweep: str = "auto",
    vocab_parallel_group=None,
    entropy_quantile_group=None,
) -> APOOutput:
    """APO loss from last hidden states and the LM head, without materializing logits.

    Args:
        hidden: ``(B, T, D)`` hidden states whose next tokens are ``targets`` (or ``(N, D)``: one sequence).
        weight: ``(V, D)`` LM-head weight (may be tied to the input embedding).
        targets: ``(B, T)`` (or ``(N,)``) sampled token ids; masked positions may hold anything (e.g. -100).
        mask: response mask, ``targets``-shaped, bool or 0/1.
        advantages: ``(B,)`` or ``targets``-shaped (from :func:`apo_kernels.group_advantages`).
        kl_weights: DADS weights ``lambda``, ``(B,)`` or ``targets``-shaped; None means 1 (plain GRPO).
        old_logps: behaviour-policy log-probs; None means the current ones, detached (ratio 1).
        ref_logps: reference-model log-probs; required when ``config.beta > 0``.
        sampling_logps: the sampler's log-probs (e.g. vLLM's; NaN where it could not score a token), read by
            ``config.off_policy_mask_threshold`` only; None means ``old_logps``.
        bias: optional ``(V,)`` LM-head bias (added after the temperature division).
        num_tokens: token-mean denominator override, e.g. the valid tokens of the whole global batch.
        num_sequences: sequence count of the seq-mean modes (default: ``B`` of this micro-batch).
        config: :class:`APOConfig`; ``config.temperature`` divides the logits.
        backend: ``"auto"`` | ``"torch"`` | ``"triton"`` (see :func:`apo_kernels.fused_linear_logprobs`).
        workspace_bytes: the most memory the sweep may take beyond the inputs and their gradients (see
            :func:`apo_kernels.fused_linear_logprobs`); in one pass it also holds the float32 gradient
            accumulators of 16-bit inputs.
        sweep: ``"one-pass"`` computes the gradients in the forward sweep, token chunk by token chunk (6 N D V
            FLOPs, backward only scales them), ``"two-pass"``
            recomputes the logits in backward (8 N D V); ``"auto"`` (default) takes one pass when gradients
            are needed and the workspace holds a large enough chunk (``apo_kernels.plan.plan_sweep``).
            ``metrics["one_pass"]`` says which ran.
        vocab_parallel_group: ``weight``/``bias`` are this rank's block of a vocabulary-parallel head; every
            other input is the same on every rank, and so are the results (see
            :func:`apo_kernels.fused_linear_logprobs`). A ``Shard(0)`` DTensor ``weight`` selects it by itself.
        entropy_quantile_group: the data-parallel process group over whose ranks' tokens the entropy threshold
            of ``config.top_entropy_quantile`` is taken (TRL gathers every process's); None: this call's only.

    Masked tokens are dropped before the vocabulary sweep, so they cost nothing.
    """
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
        backend=backend,
        workspace_bytes=workspace_bytes,
        sweep=sweep,
        vocab_parallel_group=vocab_parallel_group,
        entropy_quantile_group=entropy_quantile_group,
    )
    plan = plan_loss(inputs)
    terms = token_terms(inputs.objective, plan.dtype)
    chunk_grads = terms.one_pass_grads(plan.rows.take, plan.backend.epilogue_grads) if plan.one_pass else None
    logps, entropy, anchor = driver.sweep(inputs.head, plan, chunk_grads)
    shape = inputs.objective.mask.shape
    loss, metrics = evaluate(terms, logps.view(shape), entropy.view(shape), plan.backend.epilogue)
    return APOOutput.of(loss, logps, entropy, metrics, anchor, inputs.head.out_shape)
