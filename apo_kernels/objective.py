"""The per-token APO objective on ``(B, T)`` tensors: the one place the loss formula lives.

Every backend (the chunked torch path, the Triton kernels, the materialized-logits reference) produces
per-token log-probs and entropies and hands them to :func:`apo_objective`. The loss is written as

    loss = sum(w_pg * pg) + sum(w_kl * k) - entropy_coef * sum(w_ent * H)

with per-token weights ``w_pg`` (aggregation of the policy term), ``w_kl`` (``beta * lambda_i`` times the KL
aggregation) and ``w_ent`` (the entropy bonus's), so an aggregation mode is nothing but a weight tensor, and a fused
epilogue only has to evaluate the elementwise terms of ``pg`` and ``k`` (see ``kernels/apo_epilogue.py``, tested
against :func:`torch_epilogue`). The bonus is linear in ``H``: its derivative is its weight, no epilogue needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .config import APOConfig
from .inputs import Number, ObjectiveInputs, objective_inputs


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


def vespo_weight(ratio: torch.Tensor, advantages: torch.Tensor, config: APOConfig) -> torch.Tensor:
    """VESPO's gamma weight ``phi(w) = exp(lam + k log w - lam w)`` of the sequence ratio ``w`` (here each
    token's ``ratio``), ``k, lam`` by the advantage's sign (``A >= 0``: the positive pair), 0 where not finite."""
    nonnegative = advantages >= 0
    k = torch.where(nonnegative, ratio.new_full((), config.vespo_k_pos), ratio.new_full((), config.vespo_k_neg))
    lam = torch.where(
        nonnegative, ratio.new_full((), config.vespo_lambda_pos), ratio.new_full((), config.vespo_lambda_neg)
    )
    return torch.exp(lam + k * torch.log(ratio) - lam * ratio).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def dppo_within_divergence(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, config: APOConfig
) -> torch.Tensor:
    """DPPO-Binary's mask (verl's): tokens whose probability stayed within the divergence threshold of its
    advantage's side, ``eps_high`` for ``A > 0``, ``eps_low`` else, by total variation or by binary KL."""
    prob, old_prob = torch.exp(logps), torch.exp(old_logps)
    positive = advantages > 0
    if config.policy_loss == "dppo_tv":
        return torch.where(positive, prob - old_prob <= config.eps_high, prob - old_prob >= -config.eps_low)
    binary_kl = old_prob * (old_logps - logps) + (1 - old_prob) * torch.log(
        (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8)
    )
    return torch.where(
        positive,
        (binary_kl <= config.eps_high) | (prob <= old_prob),
        (binary_kl <= config.eps_low) | (prob >= old_prob),
    )


def policy_term(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, config: APOConfig
) -> torch.Tensor:
    """PPO's clipped surrogate ``-min(rho A, clip(rho) A)``, with ``rho`` capped at ``ratio_cap`` in the first
    branch (two-sided clipping) and verl's dual clip for ``A < 0`` when configured; or CISPO's
    ``-sg(clip(rho)) A logp``; or SAPO's ``-sigmoid(tau (rho - 1)) 4 / tau A``; or VESPO's
    ``-sg(phi(rho)) A logp`` (:func:`vespo_weight`); or DRO's ``-(A logp - beta / 2 (logp - old)^2)``; or
    DPPO's ``-sg(min(rho, c)) A logp`` within the divergence (:func:`dppo_within_divergence`); or GMPO's ``-A rho``
    (``rho`` its sequence's ratio of clipped log-ratios, :func:`sequence_ratio_old_logps`)."""
    if config.policy_loss == "dro":
        return -(advantages * logps - 0.5 * config.dro_beta * (logps - old_logps).square())
    ratio = torch.exp(logps - old_logps)
    if config.policy_loss == "gmpo":
        return -advantages * ratio
    if config.policy_loss in ("dppo_tv", "dppo_kl"):
        weight = ratio if config.clip_ratio_c is None else ratio.clamp(max=config.clip_ratio_c)
        within = dppo_within_divergence(logps.detach(), old_logps, advantages, config)
        return -(weight * within).detach() * advantages * logps
    if config.policy_loss == "vespo":
        return -vespo_weight(ratio, advantages, config).detach() * advantages * logps
    if config.policy_loss == "cispo":
        return -ratio.clamp(1.0 - config.eps_low, 1.0 + config.eps_high).detach() * advantages * logps
    if config.policy_loss == "sapo":
        # the temperatures as 0-d tensors of the ratio's dtype: float literals would round through float32
        pos, neg = ratio.new_full((), config.sapo_tau_pos), ratio.new_full((), config.sapo_tau_neg)
        tau = torch.where(advantages > 0, pos, neg)
        return -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * advantages
    unclipped = -advantages * (ratio if config.ratio_cap is None else ratio.clamp(max=config.ratio_cap))
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
    pg = policy_term(logps, old_logps, advantages, config)
    kl = kl_penalty(logps, ref_logps, config.kl_estimator)
    if config.kl_bias_correction:
        kl = kl * ratio
    loss = (w_pg * pg).sum() + (w_kl * kl).sum()
    return EpilogueOutput(loss=loss, pg=pg.detach(), kl=kl.detach(), ratio=ratio.detach())


Epilogue = Callable[..., EpilogueOutput]


EpilogueGrads = Callable[..., torch.Tensor]


def torch_epilogue_grads(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    advantages: torch.Tensor,
    w_pg: torch.Tensor,
    w_kl: torch.Tensor,
    config: APOConfig,
) -> torch.Tensor:
    """Per-token ``dL/dlogp`` of :func:`torch_epilogue`'s loss: the same formula, differentiated by ``torch.func``
    (which ``torch.compile`` traces); the one-pass sweep asks for it chunk by chunk."""

    def loss(lp):
        return torch_epilogue(lp, old_logps, ref_logps, advantages, w_pg, w_kl, config).loss

    return torch.func.grad(loss)(logps)


@dataclass(frozen=True)
class TokenWeights:
    """The ``(B, T)`` per-token factors of the loss that do not depend on the current policy."""

    advantages: torch.Tensor
    kl_weights: torch.Tensor  # DADS lambda
    w_pg: torch.Tensor  # aggregation weight of the policy term
    w_kl: torch.Tensor  # beta * lambda * aggregation weight of the KL term
    w_ent: torch.Tensor  # aggregation weight of the entropy bonus (before entropy masking's, see entropy_weights)
    log_ratio_penalty: Optional[torch.Tensor]  # c of the policy term's c |logp - old| (apo_objective's input)


def token_weights(inputs: ObjectiveInputs, dtype: torch.dtype) -> TokenWeights:
    """:class:`TokenWeights` of validated objective inputs, in ``dtype``."""
    mask, config = inputs.mask, inputs.config
    shape = mask.shape
    m = mask.to(dtype)

    def per_token(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to(dtype)
        return (x.unsqueeze(-1) if x.dim() == 1 else x).expand(shape)

    lam = (
        torch.ones(shape, dtype=dtype, device=mask.device)
        if inputs.kl_weights is None
        else per_token(inputs.kl_weights)
    )
    counts = dict(num_tokens=inputs.num_tokens, num_sequences=inputs.num_sequences, norm_len=config.loss_agg_norm)
    w_pg = aggregation_weights(m, config.loss_agg_mode, **counts)
    w_kl = aggregation_weights(m, config.kl_agg_mode, **counts) * (config.beta * lam)
    w_ent = entropy_weights(m) if config.entropy_token_mean else w_pg
    penalty = None if inputs.log_ratio_penalty is None else per_token(inputs.log_ratio_penalty)
    return TokenWeights(
        advantages=per_token(inputs.advantages),
        kl_weights=lam,
        w_pg=w_pg,
        w_kl=w_kl,
        w_ent=w_ent,
        log_ratio_penalty=penalty,
    )


def entropy_weights(tokens: torch.Tensor) -> torch.Tensor:
    """``config.entropy_token_mean``'s bonus weights: the mean over ``tokens`` (a float 0/1 ``(B, T)`` tensor)."""
    return tokens / tokens.sum().clamp(min=1)


def on_mask(x: Optional[torch.Tensor], valid: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    """``x`` (old or reference log-probs) where ``valid``, the detached current ``logps`` elsewhere (and for
    ``x = None``): masked positions may hold padding (0, -inf, NaN), and so every term stays finite there."""
    detached = logps.detach()
    return detached if x is None else torch.where(valid, x.detach().to(detached.dtype), detached)


def sequence_sums(x: torch.Tensor, valid: torch.Tensor, sequence: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each sequence's sum of ``x`` over its valid tokens, indexed like ``lengths`` (``sequence``/``lengths`` as for
    :func:`sequence_ratio_old_logps`: a chunk of whole sequences needs only its own tokens)."""
    masked = torch.where(valid, x, 0.0)
    return masked.new_zeros(lengths.shape).index_add_(0, sequence.reshape(-1), masked.reshape(-1))


def gmpo_clipped_log_ratio(log_ratio: torch.Tensor, advantages: torch.Tensor, config: APOConfig) -> torch.Tensor:
    """GMPO's token log-ratio clipped on its advantage's side: ``sgn(A) min(sgn(A) x, sgn(A) clamp(x, -eps_low,
    eps_high))`` (verl's ``geo_mean``; 0 where ``A = 0``)."""
    sign = advantages.sign()
    clamped = log_ratio.clamp(-config.eps_low, config.eps_high)
    return sign * torch.minimum(sign * log_ratio, sign * clamped)


def sequence_ratio_old_logps(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    valid: torch.Tensor,
    sequence: torch.Tensor,
    lengths: torch.Tensor,
    config: APOConfig,
) -> torch.Tensor:
    """A sequence's ratio as a token ratio: the detached ``logp - s``, so that ``exp(logp - result)`` is the
    sequence's ratio ``exp(s)`` in value and that ratio times the token's own ``d logp`` in derivative.

    GSPO: ``s`` is the mean of ``logp - old`` over each sequence's valid tokens (GSPO-token, as verl writes it).
    Every aggregation weight is constant within a sequence, so with per-sequence advantages the loss and its
    gradient are GSPO's ``exp(s)`` differentiated through ``s`` (TRL's); the epilogues stay token-wise.
    VESPO (whose weight is detached): ``s`` is the sum of the token log-ratios clamped to +-20, clamped to
    ``[log 1e-8, 20]``, as TRL's. GMPO: the mean of :func:`gmpo_clipped_log_ratio` (the derivative through ``s`` is
    :func:`gmpo_gradient_correction`'s).

    ``sequence`` holds each token's sequence index into ``lengths``, the sequences' valid-token counts (>= 1);
    ``old_logps`` is already :func:`on_mask`'d. A chunk of whole sequences needs only its own tokens.
    """
    log_ratio = logps.detach() - old_logps
    vespo = config.policy_loss == "vespo"
    if vespo:
        log_ratio = log_ratio.clamp(-20.0, 20.0)
    elif config.policy_loss == "gmpo":
        log_ratio = gmpo_clipped_log_ratio(log_ratio, advantages, config)
    sums = sequence_sums(log_ratio, valid, sequence, lengths)
    seq_log_ratio = sums.clamp(math.log(1e-8), 20.0) if vespo else sums / lengths
    return logps.detach() - seq_log_ratio[sequence]


def sequence_index(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sequence, lengths)`` of :func:`sequence_ratio_old_logps` for a ``(B, T)`` bool mask: the row index of
    each token, and each row's valid-token count (at least 1)."""
    batch, length = valid.shape
    rows = torch.arange(batch, device=valid.device).unsqueeze(-1).expand(batch, length)
    return rows, valid.sum(-1).clamp(min=1)


def entropy_threshold(entropy: torch.Tensor, valid: torch.Tensor, quantile: float, group=None) -> torch.Tensor:
    """The ``quantile`` quantile (linearly interpolated, as ``torch.quantile``) of the valid tokens' entropies,
    over every rank of the process ``group`` when given (ranks may hold different shapes); NaN without valid
    tokens. Sorting with the masked entropies set to +inf keeps the shapes static (``torch.compile``)."""
    values = torch.where(valid, entropy, torch.inf).reshape(-1)
    count = valid.sum().reshape(1)
    if group is not None:
        size = torch.tensor([values.numel()], device=values.device)
        dist.all_reduce(size, op=dist.ReduceOp.MAX, group=group)
        values = torch.nn.functional.pad(values, (0, int(size.item()) - values.numel()), value=torch.inf)
        gathered = [torch.empty_like(values) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, values, group=group)
        values = torch.cat(gathered)
        dist.all_reduce(count, group=group)
    if values.numel() == 0:
        return entropy.new_full((), float("nan"))
    ranked = values.sort().values
    position = quantile * (count - 1).to(values.dtype)
    lower = position.floor().long().clamp(min=0)
    upper = torch.minimum(lower + 1, (count - 1).clamp(min=0))
    return torch.lerp(ranked[lower], ranked[upper], position - lower).squeeze(0)


def policy_term_factor(factor: torch.Tensor, valid: torch.Tensor, config: APOConfig) -> torch.Tensor:
    """A non-negative ``(B, T)`` weight of each token's policy term as a factor of the advantages (each policy
    term but DRO's is positively homogeneous in ``A``). A sequence ratio's term (all but CISPO's, whose
    gradient is per token) is one per sequence, weighted by every token's factor as TRL weights it: that is
    the term with the factor's mean over the sequence's valid tokens, in value and in gradient."""
    if config.importance_sampling_level == "sequence" and config.policy_loss != "cispo":
        factor = (factor * valid).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
    return factor.expand(valid.shape)


def high_entropy_tokens(entropy: torch.Tensor, valid: torch.Tensor, config: APOConfig, group=None) -> torch.Tensor:
    """``(B, T)`` bool: the valid tokens whose entropy reaches the ``1 - config.top_entropy_quantile`` quantile, on
    which the policy term trains (TRL's entropy mask; a sequence ratio's term takes the sequence's share of them,
    :func:`policy_term_factor`)."""
    threshold = entropy_threshold(entropy, valid, 1.0 - config.top_entropy_quantile, group)
    return valid & (entropy >= threshold)


def off_policy_keep(
    logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    valid: torch.Tensor,
    advantages: torch.Tensor,
    sequence: torch.Tensor,
    lengths: torch.Tensor,
    config: APOConfig,
) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (``config.off_policy_mask_threshold``) as a factor of the
    advantages: 0 on the tokens of negative advantage in a sequence whose mean ``sampling_logp - logp`` over its
    valid tokens exceeds the threshold (TRL's ``get_off_policy_mask``; NaN sampling log-probs count 0), else 1;
    a sequence ratio's term takes the factor's mean over its sequence (:func:`policy_term_factor`).

    ``sequence``/``lengths`` as for :func:`sequence_ratio_old_logps`: the means are per sequence index, so a
    one-pass chunk (one row of several whole sequences) needs only its own tokens."""

    sequence_mean = lambda x: (sequence_sums(x, valid, sequence, lengths) / lengths)[sequence]

    low_kl = (
        sequence_mean(torch.nan_to_num(sampling_logps - logps.detach(), nan=0.0)) <= config.off_policy_mask_threshold
    )
    keep = ((advantages >= 0) | low_kl).to(logps.dtype)
    if config.importance_sampling_level == "sequence" and config.policy_loss != "cispo":
        keep = sequence_mean(keep)
    return keep


def policy_advantages(
    terms: "TokenTerms",
    logps: torch.Tensor,
    valid: torch.Tensor,
    advantages: torch.Tensor,
    sampling_logps: Optional[torch.Tensor],
    old_logps: Optional[torch.Tensor],
    sequence: Optional[torch.Tensor],
) -> torch.Tensor:
    """The advantages the policy term sees, with the off-policy mask applied (when configured); the sampler's
    log-probs default to the old ones, those to the current ones (on-policy: nothing is masked)."""
    config = terms.inputs.config
    if config.off_policy_mask_threshold is None:
        return advantages
    sampling = on_mask(sampling_logps if sampling_logps is not None else old_logps, valid, logps)
    return advantages * off_policy_keep(logps, sampling, valid, advantages, sequence, terms.lengths, config)


def sequence_kl_bias_correction(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    w_kl: torch.Tensor,
    valid: torch.Tensor,
    sequence: torch.Tensor,
    lengths: torch.Tensor,
    config: APOConfig,
) -> torch.Tensor:
    """The detached per-token ``dL/dlogp`` that the bias-corrected KL lacks with sequence ratios
    (``config.kl_bias_correction`` and ``importance_sampling_level="sequence"``), given the epilogue's.

    TRL weights every token's KL by its sequence's ratio ``R = exp(s)``, ``s`` the mean log-ratio, so token ``j``'s
    derivative is ``R (w_j kl'_j + mean_t(w_t kl_t))``; the token-wise epilogue's ratio
    (:func:`sequence_ratio_old_logps`) gives ``R (w_j kl'_j + w_j kl_j)``. This is the difference,
    ``R (mean_t(w_t kl_t) - w_j kl_j)``, the means over each sequence's valid tokens (``sequence``/``lengths``: a
    chunk of whole sequences suffices).
    ``old_logps`` is the sequence ratio's (``exp(logp - old) = R``)."""
    with torch.no_grad():
        ratio = torch.exp(logps - old_logps)
        weighted = torch.where(valid, w_kl * kl_penalty(logps, ref_logps, config.kl_estimator), 0.0)
        means = sequence_sums(weighted, valid, sequence, lengths) / lengths
        return torch.where(valid, ratio * (means[sequence] - weighted), 0.0)


def gmpo_gradient_correction(
    logps: torch.Tensor,
    token_old_logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    w_pg: torch.Tensor,
    valid: torch.Tensor,
    sequence: torch.Tensor,
    lengths: torch.Tensor,
    config: APOConfig,
) -> torch.Tensor:
    """The detached per-token ``dL/dlogp`` that GMPO's policy term lacks in the token-wise epilogue, given the
    epilogue's.

    The term is ``-R sum_t w_t A_t`` per sequence, ``R = exp(s)`` and ``s`` the mean of the clipped log-ratios
    (:func:`gmpo_clipped_log_ratio`), so token ``j``'s derivative is ``-R (sum_t w_t A_t) k_j / L``, with ``k_j``
    1 where its clip lets its log-ratio through (0 where it acts or ``A_j = 0``) and ``L`` the sequence's valid
    tokens; the epilogue's ratio (:func:`sequence_ratio_old_logps`, ``old_logps``) gives ``-R w_j A_j``. This is the
    difference (``token_old_logps``: the token's own old log-probs; a chunk of whole sequences suffices)."""
    with torch.no_grad():
        log_ratio = logps - token_old_logps
        through = (gmpo_clipped_log_ratio(log_ratio, advantages, config) == log_ratio) & (advantages != 0)
        ratio = torch.exp(logps - old_logps)
        weighted = w_pg * advantages
        sums = sequence_sums(weighted, valid, sequence, lengths)[sequence]
        exact = -ratio * sums * through / lengths[sequence]
        return torch.where(valid, exact + ratio * weighted, 0.0)


def sequence_gradient_correction(
    logps: torch.Tensor,
    token_old_logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    advantages: torch.Tensor,
    w_pg: torch.Tensor,
    w_kl: torch.Tensor,
    valid: torch.Tensor,
    sequence: Optional[torch.Tensor],
    lengths: Optional[torch.Tensor],
    config: APOConfig,
) -> Optional[torch.Tensor]:
    """The detached ``dL/dlogp`` that the token-wise epilogue lacks where a sequence's ratio is differentiated
    through every token of it (:func:`sequence_kl_bias_correction`, :func:`gmpo_gradient_correction`); None where
    it lacks none. Two passes add it as a zero-valued term, the one-pass sweep to each chunk's derivatives."""
    corrections = []
    if config.kl_bias_correction and config.importance_sampling_level == "sequence" and config.beta > 0:
        corrections.append(
            sequence_kl_bias_correction(logps, old_logps, ref_logps, w_kl, valid, sequence, lengths, config)
        )
    if config.policy_loss == "gmpo":
        corrections.append(
            gmpo_gradient_correction(
                logps, token_old_logps, old_logps, advantages, w_pg, valid, sequence, lengths, config
            )
        )
    return sum(corrections) if corrections else None


@dataclass(frozen=True)
class TokenTerms:
    """Everything per token that does not depend on the current policy, built once per call."""

    inputs: ObjectiveInputs
    weights: TokenWeights
    sequence: Optional[torch.Tensor]  # (B, T) sequence index of each token, when terms read whole sequences
    lengths: Optional[torch.Tensor]  # (B,) valid tokens of each sequence (at least 1), in the terms' dtype

    def one_pass_grads(self, take: Callable[[torch.Tensor], torch.Tensor], epilogue_grads: EpilogueGrads):
        """The one-pass sweep's hook (``driver.ChunkGrads``) over the swept rows ``take`` selects."""
        return OnePassGrads(self, take, epilogue_grads)


def token_terms(inputs: ObjectiveInputs, dtype: torch.dtype) -> TokenTerms:
    """:class:`TokenTerms` of validated objective inputs, in ``dtype`` (that of the log-probs to come)."""
    sequence = lengths = None
    if inputs.config.whole_sequences:
        sequence, lengths = sequence_index(inputs.mask)
        lengths = lengths.to(dtype)
    return TokenTerms(inputs, token_weights(inputs, dtype), sequence, lengths)


class OnePassGrads:
    """``dL/dlogp`` and ``dL/dH`` of a chunk ``[n0, n1)`` of the swept rows from its log-probs and entropies
    (``driver.ChunkGrads``): the per-token terms flattened into the sweep's rows once, the epilogue's
    derivatives per chunk. With sequence-level ratios the chunk holds whole sequences (``Plan.chunk_ends``)."""

    def __init__(self, terms: TokenTerms, take: Callable[[torch.Tensor], torch.Tensor], epilogue_grads: EpilogueGrads):
        flat = lambda x: None if x is None else take(x.reshape(-1))
        inputs, weights = terms.inputs, terms.weights
        self.config, self.epilogue_grads = inputs.config, epilogue_grads
        self.valid, self.old, self.ref = flat(inputs.mask), flat(inputs.old_logps), flat(inputs.ref_logps)
        self.sampling, self.terms = flat(inputs.sampling_logps), terms
        self.advantages, self.w_pg, self.w_kl = flat(weights.advantages), flat(weights.w_pg), flat(weights.w_kl)
        # the entropy bonus's derivative is its weight (one pass has no entropy masking to reweigh it)
        bonus = self.config.entropy_coef != 0
        self.d_entropy = -self.config.entropy_coef * flat(weights.w_ent) if bonus else None
        # masked rows a compiled sweep keeps get sequence 0: they are not valid, so they add nothing
        self.sequence, self.lengths = flat(terms.sequence), terms.lengths

    def __call__(self, n0: int, n1: int, logps: torch.Tensor, entropy: torch.Tensor):
        chunk = lambda x: None if x is None else x[n0:n1].view(1, -1)  # (one (B, T) row for the epilogue)
        lp, ok, sequence = logps.view(1, -1), chunk(self.valid), chunk(self.sequence)
        advantages = chunk(self.advantages)
        policy_adv = policy_advantages(self.terms, lp, ok, advantages, chunk(self.sampling), chunk(self.old), sequence)
        token_old = old = on_mask(chunk(self.old), ok, lp)
        if self.config.sequence_ratio:
            old = sequence_ratio_old_logps(lp, token_old, advantages, ok, sequence, self.lengths, self.config)
        ref, w_pg, w_kl = on_mask(chunk(self.ref), ok, lp), chunk(self.w_pg), chunk(self.w_kl)
        d_logp = self.epilogue_grads(lp, old, ref, policy_adv, w_pg, w_kl, self.config)
        correction = sequence_gradient_correction(
            lp, token_old, old, ref, policy_adv, w_pg, w_kl, ok, sequence, self.lengths, self.config
        )
        if correction is not None:
            d_logp = d_logp + correction
        return d_logp.view(-1), None if self.d_entropy is None else self.d_entropy[n0:n1]


def evaluate(
    terms: TokenTerms, logps: torch.Tensor, entropy: Optional[torch.Tensor], epilogue: Epilogue = torch_epilogue
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and metrics of ``(B, T)`` ``logps`` (and entropies) under ``terms``."""
    inputs, weights = terms.inputs, terms.weights
    config, valid = inputs.config, inputs.mask
    token_old = old = on_mask(inputs.old_logps, valid, logps)
    if config.sequence_ratio:
        old = sequence_ratio_old_logps(
            logps, token_old, weights.advantages, valid, terms.sequence, terms.lengths, config
        )
    advantages = policy_advantages(
        terms, logps, valid, weights.advantages, inputs.sampling_logps, inputs.old_logps, terms.sequence
    )
    w_ent = weights.w_ent
    if config.top_entropy_quantile < 1:
        high = high_entropy_tokens(entropy.detach(), valid, config, inputs.entropy_quantile_group).to(logps.dtype)
        advantages = advantages * policy_term_factor(high, valid, config)
        if config.entropy_token_mean:  # TRL's bonus acts on the tokens its policy term trains on
            w_ent = entropy_weights(high)
    # the metrics read the unmasked advantages, as TRL's clip fractions do
    ref = on_mask(inputs.ref_logps, valid, logps)
    out = epilogue(logps, old, ref, advantages, weights.w_pg, weights.w_kl, config)
    if config.entropy_coef != 0 and entropy is not None:
        out = replace(out, loss=out.loss - config.entropy_coef * (w_ent * entropy).sum())
    if weights.log_ratio_penalty is not None:  # a part of the policy term: in its metric too
        penalty = weights.log_ratio_penalty * (logps - token_old).abs()
        out = replace(out, loss=out.loss + (weights.w_pg * penalty).sum(), pg=out.pg + penalty.detach())
    loss = out.loss
    correction = sequence_gradient_correction(
        logps, token_old, old, ref, advantages, weights.w_pg, weights.w_kl, valid, terms.sequence, terms.lengths, config
    )
    if correction is not None:  # 0 in value, the missing derivative in gradient
        loss = loss + (correction * (logps - logps.detach())).sum()
    metrics = objective_metrics(out, entropy, valid, weights, config, logps.detach() - token_old)
    if config.entropy_token_mean and entropy is not None:  # what TRL's adaptive entropy coefficient tracks
        bonus_tokens = (w_ent > 0).sum().to(logps.dtype)
        metrics["bonus_entropy"] = (w_ent * entropy.detach()).sum()
        metrics["bonus_tokens"] = bonus_tokens
    return loss, metrics


@dataclass(frozen=True)
class APOOutput:
    """Result of :func:`apo_kernels.apo_loss` (and of the oracle, ``apo_kernels.reference.apo_loss``).

    Attributes:
        loss: scalar loss, differentiable with respect to ``hidden``, ``weight`` and ``bias``.
        logps: detached target-shaped log-probs (0 at masked positions).
        entropy: detached target-shaped entropies (0 at masked positions).
        metrics: detached scalar tensors: ``pg_loss``, ``kl``, ``entropy``, ``clip_frac_low``,
            ``clip_frac_high``, ``ratio_mean``, ``kl_weight_mean`` (and ``clip_frac_dual`` with a dual clip,
            ``vespo_phi_mean`` with VESPO; with ``entropy_token_mean``, ``bonus_entropy`` and ``bonus_tokens``: the
            mean entropy of the tokens the bonus acts on and their count), and ``one_pass``: 1 when the gradients
            came out of the forward sweep, 0 when backward sweeps again (see ``sweep`` of
            :func:`apo_kernels.apo_loss`). Token means, except that with sequence ratios the clip fractions and
            VESPO's weight are means over the sequences with tokens.
    """

    loss: torch.Tensor
    logps: torch.Tensor
    entropy: torch.Tensor
    metrics: dict[str, torch.Tensor]

    @classmethod
    def of(cls, loss, logps, entropy, metrics, anchor: Optional[torch.Tensor], out_shape) -> "APOOutput":
        """The output of :func:`evaluate`'s ``loss`` and ``metrics`` on the sweep's flat ``logps`` and ``entropy``;
        ``anchor`` is the zero that carries the gradients of a one-pass sweep, None after two passes."""
        metrics["one_pass"] = torch.full(
            (), float(anchor is not None), dtype=loss.dtype, device=loss.device
        )  # no H2D copy
        # Clones, so a caller editing these in place cannot touch tensors autograd saved.
        return cls(
            loss=loss if anchor is None else loss + anchor,
            logps=logps.detach().clone().view(out_shape),
            entropy=entropy.detach().clone().view(out_shape),
            metrics=metrics,
        )


def apo_objective(
    logps: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    entropy: Optional[torch.Tensor] = None,
    kl_weights: Optional[torch.Tensor] = None,
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    sampling_logps: Optional[torch.Tensor] = None,
    log_ratio_penalty: Optional[torch.Tensor] = None,
    config: APOConfig = APOConfig(),
    num_tokens: Optional[Number] = None,
    num_sequences: Optional[Number] = None,
    entropy_quantile_group=None,
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
        sampling_logps: ``(B, T)`` the sampler's log-probs, read by ``config.off_policy_mask_threshold`` only
            (NaN where it could not score a token); None means ``old_logps``.
        log_ratio_penalty: ``(B,)`` or ``(B, T)`` coefficients ``c >= 0`` of a penalty ``c |logp - old_logp|`` added
            to each token's policy term (verl's ``kl_cov`` on the tokens it selects); None: none.
        num_tokens, num_sequences: global normalizers, see :func:`aggregation_weights`.
        entropy_quantile_group: process group over whose ranks' tokens ``config.top_entropy_quantile``'s
            threshold is taken (TRL gathers every process's); None: these tokens only.
        epilogue: evaluates the elementwise terms (:func:`torch_epilogue` or the fused Triton one).

    Returns:
        ``(loss, metrics)``: the scalar loss and a dict of detached scalar tensors.
    """
    inputs = objective_inputs(
        logps,
        mask,
        advantages,
        entropy=entropy,
        kl_weights=kl_weights,
        old_logps=old_logps,
        ref_logps=ref_logps,
        sampling_logps=sampling_logps,
        log_ratio_penalty=log_ratio_penalty,
        config=config,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        entropy_quantile_group=entropy_quantile_group,
    )
    return evaluate(token_terms(inputs, logps.dtype), logps, entropy, epilogue)


def objective_metrics(
    out: EpilogueOutput,
    entropy: Optional[torch.Tensor],
    valid: torch.Tensor,
    weights: TokenWeights,
    config: APOConfig,
    token_log_ratio: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The detached scalar metrics of :func:`apo_objective` from its epilogue's per-token terms (and each token's
    own log-ratio to the old policy, which GMPO clips)."""
    dtype = out.pg.dtype
    m = valid.to(dtype)
    adv = weights.advantages
    n_valid = m.sum().clamp(min=1)
    token_mean = lambda x: (m * x).sum() / n_valid  # (metrics: plain mean over valid tokens)
    per_ratio_mean = token_mean  # a mean over what owns a ratio: tokens, or sequences (clipped sequences count, as TRL)
    if config.sequence_ratio:
        lengths = m.sum(-1)
        per_ratio_mean = lambda x: ((m * x).sum(-1) / lengths.clamp(min=1)).sum() / (lengths > 0).sum().clamp(min=1)
    # The clip fractions read the ratio the surrogate's first branch uses (capped, with two-sided clipping), as TRL.
    ratio = out.ratio if config.ratio_cap is None else out.ratio.clamp(max=config.ratio_cap)
    metrics = {
        "pg_loss": (weights.w_pg * out.pg).sum(),
        "kl": token_mean(out.kl),
        "entropy": token_mean(entropy.detach()) if entropy is not None else m.new_zeros(()),
        "clip_frac_low": per_ratio_mean(((ratio < 1.0 - config.eps_low) & (adv < 0)).to(dtype)),
        "clip_frac_high": per_ratio_mean(((ratio > 1.0 + config.eps_high) & (adv > 0)).to(dtype)),
        "ratio_mean": token_mean(out.ratio),
        "kl_weight_mean": token_mean(weights.kl_weights),
    }
    if config.policy_loss == "gmpo":  # its clips act on the token log-ratios: the fractions of tokens they stop
        metrics["clip_frac_low"] = token_mean(((token_log_ratio < -config.eps_low) & (adv < 0)).to(dtype))
        metrics["clip_frac_high"] = token_mean(((token_log_ratio > config.eps_high) & (adv > 0)).to(dtype))
    if config.policy_loss == "vespo":  # the mean weight of a sequence, as TRL's vespo/phi_seq_mean
        metrics["vespo_phi_mean"] = per_ratio_mean(vespo_weight(out.ratio, adv, config))
    if config.clip_ratio_c is not None and config.policy_loss == "ppo":
        metrics["clip_frac_dual"] = per_ratio_mean(((out.ratio > config.clip_ratio_c) & (adv < 0)).to(dtype))
    return {k: v.detach() for k, v in metrics.items()}
