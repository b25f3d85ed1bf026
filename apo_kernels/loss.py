"""``apo_loss``: the APO loss straight from hidden states and the LM head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import checks, driver, vocab_parallel
from .config import APOConfig
from .logprobs import (
    RowSelection, check_head_inputs, check_mask, check_workspace_bytes, linear_logprobs, resolve_backend, row_pass_of,
)
from .objective import (
    Number, apo_objective, on_mask, sequence_index, sequence_ratio_old_logps, token_weights, torch_epilogue,
    torch_epilogue_grads,
)


@dataclass(frozen=True)
class APOOutput:
    """Result of :func:`apo_loss`.

    Attributes:
        loss: scalar loss, differentiable with respect to ``hidden``, ``weight`` and ``bias``.
        logps: detached target-shaped log-probs (0 at masked positions).
        entropy: detached target-shaped entropies (0 at masked positions).
        metrics: detached scalar tensors: ``pg_loss``, ``kl``, ``entropy``, ``clip_frac_low``,
            ``clip_frac_high``, ``ratio_mean``, ``kl_weight_mean`` (and ``clip_frac_dual`` with a dual clip,
            ``vespo_phi_mean`` with VESPO), and ``one_pass``: 1 when the gradients came out of the forward
            sweep, 0 when backward sweeps again (see ``sweep`` of :func:`apo_loss`). Token means, except that
            with sequence ratios the clip fractions and VESPO's weight are means over the sequences with tokens.
    """

    loss: torch.Tensor
    logps: torch.Tensor
    entropy: torch.Tensor
    metrics: dict[str, torch.Tensor]


@dataclass(frozen=True)
class LossInputs:
    """Validated inputs of the loss, viewed as ``(B, T)`` (flat ``(N,)`` inputs are one sequence)."""

    hidden: torch.Tensor  # (B, T, D)
    targets: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T) bool
    advantages: torch.Tensor  # (B,) or (B, T)
    kl_weights: Optional[torch.Tensor]
    old_logps: Optional[torch.Tensor]
    ref_logps: Optional[torch.Tensor]
    out_shape: torch.Size
    shard: Optional[vocab_parallel.VocabShard] = None  # this rank's block of a vocabulary-parallel head


def _per_sequence_or_token(name, x, hidden, mask, values: checks.ValueChecks, *, non_negative=False):
    """A ``(B,)`` or target-shaped float tensor on ``hidden``'s device, viewed as ``(B,)`` / ``(B, T)``; its
    value checks join ``values``."""
    checks.float_tensor(name, x)
    target_shape = hidden.shape[:-1]
    batch = 1 if len(target_shape) == 1 else target_shape[0]
    if tuple(x.shape) == tuple(target_shape):
        x, where = x.view(mask.shape), mask
    elif len(target_shape) == 2 and tuple(x.shape) == (batch,):
        where = mask.any(-1)
    else:
        options = f"(B,) = ({batch},) or " if len(target_shape) == 2 else ""
        raise ValueError(f"{name} must have shape {options}targets.shape = {tuple(target_shape)}, got {tuple(x.shape)}")
    checks.same_device(name, x, hidden, "hidden")
    values.finite(name, x, where)
    if non_negative:
        values.in_range(name, x, 0, float("inf"), where)
    return x


def _positive_count(name, x, values: checks.ValueChecks) -> None:
    if x is None:
        return
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a positive scalar, got a tensor of shape {tuple(x.shape)}")
        values.positive(name, x)
    elif isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0:
        raise ValueError(f"{name} must be a positive number or scalar tensor, got {x!r}")


def prepare_loss_inputs(
    hidden, weight, targets, mask, advantages, *, kl_weights, old_logps, ref_logps, bias, num_tokens,
    num_sequences, config, vocab_parallel_group=None,
) -> LossInputs:
    """Validated ``(B, T)`` views of the inputs; ``weight`` and ``bias`` must already be local tensors (see
    :func:`apo_kernels.vocab_parallel.unwrap_dtensors`). With ``vocab_parallel_group``, ``shard`` is this rank's vocabulary block.
    The value checks are read together, with one host sync, after every type, shape and device check."""
    if not isinstance(config, APOConfig):
        raise TypeError(f"config must be an APOConfig, got {type(config).__name__}")
    checks.float_tensor("hidden", hidden)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must have shape (B, T, D) or (N, D), got {tuple(hidden.shape)}")
    values = checks.ValueChecks()
    valid = check_mask(mask, hidden, values)
    shard = check_head_inputs(hidden, weight, targets, bias, valid, vocab_parallel_group, values)
    target_shape = targets.shape
    seq_mask = valid.view(1, -1) if hidden.dim() == 2 else valid

    advantages = _per_sequence_or_token("advantages", advantages, hidden, seq_mask, values)
    if kl_weights is not None:
        kl_weights = _per_sequence_or_token("kl_weights", kl_weights, hidden, seq_mask, values, non_negative=True)
    for name, x in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if x is not None:
            checks.float_tensor(name, x)
            checks.shape(name, x, target_shape, "targets.shape")
            checks.same_device(name, x, hidden, "hidden")
            values.finite(name, x, valid)
    if ref_logps is None and config.beta > 0:
        raise ValueError(
            f"ref_logps is required when config.beta > 0 (beta={config.beta}); pass the reference model's "
            "log-probs or set beta=0"
        )
    _positive_count("num_tokens", num_tokens, values)
    _positive_count("num_sequences", num_sequences, values)
    values.verify()

    view = seq_mask.shape
    as_bt = lambda x: None if x is None else x.view(view)  # noqa: E731
    return LossInputs(
        hidden=hidden.view(*view, hidden.shape[-1]),
        targets=targets.view(view),
        mask=seq_mask,
        advantages=advantages,
        kl_weights=kl_weights,
        old_logps=as_bt(old_logps),
        ref_logps=as_bt(ref_logps),
        out_shape=target_shape,
        shard=shard,
    )


def finish_loss(
    inputs: LossInputs, logps, entropy, *, config, num_tokens, num_sequences, epilogue=torch_epilogue,
    anchor: Optional[torch.Tensor] = None, entropy_quantile_group=None,
) -> APOOutput:
    """Run the shared objective on ``(B, T)`` log-probs and package the result; ``anchor`` is the zero that
    carries the gradients of a one-pass sweep (``driver.OnePassLinearLogprobs``), None after two passes."""
    loss, metrics = apo_objective(
        logps,
        inputs.mask,
        inputs.advantages,
        entropy=entropy,
        kl_weights=inputs.kl_weights,
        old_logps=inputs.old_logps,
        ref_logps=inputs.ref_logps,
        config=config,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        entropy_quantile_group=entropy_quantile_group,
        epilogue=epilogue,
    )
    metrics["one_pass"] = torch.full((), float(anchor is not None), dtype=loss.dtype, device=loss.device)  # no H2D copy
    # Clones, so a caller editing these in place cannot touch tensors autograd saved.
    return APOOutput(
        loss=loss if anchor is None else loss + anchor,
        logps=logps.detach().clone().view(inputs.out_shape),
        entropy=entropy.detach().clone().view(inputs.out_shape),
        metrics=metrics,
    )


def sequence_chunk_ends(mask: torch.Tensor) -> tuple[list[int], int]:
    """Where each ``(B, T)`` ``mask`` row's tokens end among the rows the sweep visits (:class:`RowSelection`'s),
    the only places a one-pass chunk may end with sequence-level ratios, and the most tokens a row has there
    (at least 1). Under ``torch.compile`` every row is swept, so the ends are static."""
    batch, length = mask.shape
    counts = mask.sum(-1).tolist() if checks.values_checked(mask) else [length] * batch
    ends, total, longest = [], 0, 1
    for count in counts:
        total, longest = total + count, max(longest, count)
        if count:
            ends.append(total)
    return ends, longest


def one_pass_logprobs(
    inputs: LossInputs, weight, bias, *, config, num_tokens, num_sequences, row_pass, tile, epilogue_grads,
    chunk_ends=None,
):
    """``(B, T)`` log-probs and entropies (no gradient) and the anchor of the loss's gradients, from one sweep
    that asks ``epilogue_grads`` for each chunk's ``dL/dlogp`` and ``dL/dH`` (``driver.OnePassLinearLogprobs``);
    ``chunk_ends`` (:func:`sequence_chunk_ends`) keeps sequences whole for sequence-level ratios."""
    shape = inputs.mask.shape
    acc = driver.compute_dtype(inputs.hidden, weight, bias)
    weights = token_weights(inputs.mask, inputs.advantages, kl_weights=inputs.kl_weights, config=config,
                            num_tokens=num_tokens, num_sequences=num_sequences, dtype=acc)
    rows = RowSelection(inputs.mask.reshape(-1))
    flat = lambda x: None if x is None else rows.take(x.reshape(-1))  # noqa: E731
    valid, old, ref = flat(inputs.mask), flat(inputs.old_logps), flat(inputs.ref_logps)
    adv, w_pg, w_kl = flat(weights.advantages), flat(weights.w_pg), flat(weights.w_kl)
    sequence_level = config.sequence_ratio
    if sequence_level:  # masked rows a compiled sweep keeps get sequence 0: they are not valid, so add nothing
        sequence, lengths = sequence_index(inputs.mask)
        sequence, lengths = flat(sequence), lengths.to(acc)

    def token_grads(n0, n1, logps, entropy):
        chunk = lambda x: x[n0:n1].view(1, -1)  # noqa: E731  (one (B, T) row for the epilogue)
        lp, ok = logps.view(1, -1), chunk(valid)
        chunk_old = on_mask(None if old is None else chunk(old), ok, lp)
        if sequence_level:  # the chunk holds whole sequences (chunk_ends)
            chunk_old = sequence_ratio_old_logps(lp, chunk_old, ok, chunk(sequence), lengths, config)
        d_logp, d_entropy = epilogue_grads(
            lp, entropy.view(1, -1), chunk_old, on_mask(None if ref is None else chunk(ref), ok, lp), chunk(adv),
            chunk(w_pg), chunk(w_kl), config,
        )
        return d_logp.view(-1), None if d_entropy is None else d_entropy.view(-1)

    logps, entropy, anchor = driver.OnePassLinearLogprobs.apply(
        rows.take(inputs.hidden.reshape(-1, inputs.hidden.shape[-1])), weight, bias, flat(inputs.targets),
        config.temperature, row_pass, tile, inputs.shard, token_grads, chunk_ends,
    )
    return rows.put(logps).view(shape), rows.put(entropy).view(shape), anchor


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
            are needed and the workspace holds a large enough chunk (``apo_kernels.driver.plan_sweep``).
            ``metrics["one_pass"]`` says which ran.
        vocab_parallel_group: ``weight``/``bias`` are this rank's block of a vocabulary-parallel head; every
            other input is the same on every rank, and so are the results (see
            :func:`apo_kernels.fused_linear_logprobs`). A ``Shard(0)`` DTensor ``weight`` selects it by itself.
        entropy_quantile_group: the data-parallel process group over whose ranks' tokens the entropy threshold
            of ``config.top_entropy_quantile`` is taken (TRL gathers every process's); None: this call's only.

    Masked tokens are dropped before the vocabulary sweep, so they cost nothing.
    """
    hidden, weight, bias, group = vocab_parallel.unwrap_dtensors(hidden, weight, bias, vocab_parallel_group)
    inputs = prepare_loss_inputs(
        hidden, weight, targets, mask, advantages, kl_weights=kl_weights, old_logps=old_logps,
        ref_logps=ref_logps, bias=bias, num_tokens=num_tokens, num_sequences=num_sequences, config=config,
        vocab_parallel_group=group,
    )
    resolved = resolve_backend(backend, hidden.device)
    workspace_bytes = check_workspace_bytes(workspace_bytes)
    budget = driver.default_workspace_bytes(hidden.device) if workspace_bytes is None else workspace_bytes
    grad_enabled = torch.is_grad_enabled()
    needs_grad = (grad_enabled and hidden.requires_grad,
                  grad_enabled and (weight.requires_grad or (bias is not None and bias.requires_grad)))
    row_pass = row_pass_of(resolved)
    flat_hidden = inputs.hidden.reshape(-1, inputs.hidden.shape[-1])
    if config.top_entropy_quantile < 1:  # the threshold needs every token's entropy before any gradient
        if sweep == "one-pass":
            raise ValueError("sweep='one-pass' cannot apply config.top_entropy_quantile < 1, whose entropy threshold "
                             "needs every token's entropy before any gradient; use sweep='auto' or 'two-pass'")
        sweep = "two-pass" if sweep == "auto" else sweep
    chunk_ends, longest = None, 1
    if config.sequence_ratio:  # one-pass chunks hold whole sequences
        chunk_ends, longest = sequence_chunk_ends(inputs.mask)
    plan = driver.plan_sweep(sweep, flat_hidden, weight, bias, row_pass, budget, needs_grad=needs_grad,
                             min_chunk_rows=longest, shard=inputs.shard)
    epilogue, epilogue_grads = torch_epilogue, torch_epilogue_grads
    if resolved == "triton":
        from .kernels import apo_epilogue as epilogue, apo_epilogue_grads as epilogue_grads
    if plan.one_pass:
        logps, entropy, anchor = one_pass_logprobs(
            inputs, weight, bias, config=config, num_tokens=num_tokens, num_sequences=num_sequences,
            row_pass=row_pass, tile=plan.tile, epilogue_grads=epilogue_grads, chunk_ends=chunk_ends,
        )
    else:
        logps, entropy = linear_logprobs(
            flat_hidden, weight, inputs.targets.reshape(-1), bias, config.temperature, resolved,
            mask=inputs.mask.reshape(-1), workspace_bytes=budget, shard=inputs.shard,
        )
        logps, entropy, anchor = logps.view(inputs.mask.shape), entropy.view(inputs.mask.shape), None
    return finish_loss(
        inputs, logps, entropy, config=config, num_tokens=num_tokens, num_sequences=num_sequences,
        epilogue=epilogue, anchor=anchor, entropy_quantile_group=entropy_quantile_group,
    )
