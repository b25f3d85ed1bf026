"""The APO actor loss in verl's new-engine loss hook (``policy_loss.loss_mode=apo``).

verl 0.9's actor worker trains with ``loss_fn(config, model_output, data, dp_group)``, which
``ActorRolloutRefWorker.init_model`` builds as ``partial(ppo_loss, config=actor_config)`` and hands to the
engine with ``set_loss_fn``. That function sees the whole micro-batch ``TensorDict``, so it is the one hook
that can read APO's per-sample KL weights (``returns``, written by :mod:`.advantage`); verl's policy-loss
registry cannot, because its functions only receive the PPO tensors and verl adds its own, unweighted,
KL term afterwards. :func:`ppo_loss_with_apo` is what the worker binds instead of ``ppo_loss``: for
``loss_mode=apo`` it runs :func:`apo_actor_loss`, for every other loss mode verl's ``ppo_loss`` unchanged.

The APO hyperparameters are verl's own actor fields (see :func:`loss_stage_config`); the one APO option
verl's actor config has no field for, the KL aggregation, is read from ``$APO_VERL_KL_AGG_MODE``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from verl.trainer.ppo.core_algos import register_policy_loss
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.losses import ppo_loss as verl_ppo_loss
from verl.workers.utils.padding import no_padding_2_padding

from apo_kernels import AGG_MODES, APOConfig, APOOutput, apo_objective
from apo_kernels.objective import aggregation_weights

from .covariance import clip_cov_selection, kl_cov_selection

LOSS_MODE = "apo"
#: verl ``policy_loss.loss_mode`` names of APO and the ``APOConfig`` fields each sets over the actor's: ``apo``
#: PPO's clipped surrogate with verl's dual clip (``vanilla``); ``apo_cispo``, ``apo_sapo``, ``apo_gspo`` and
#: ``apo_gpg`` verl's ``cispo``, ``sapo``, ``gspo`` and ``gpg`` terms (none with the dual clip), ``apo_dro``,
#: ``apo_dppo_tv`` and ``apo_dppo_kl`` verl's ``dro`` (``policy_loss.dro_beta``) and DPPO-Binary terms (whose
#: ``clip_ratio_low/high`` are divergence thresholds, ``clip_ratio_c`` the weight's truncation). GPG's
#: ``-A logp`` is CISPO's term with the clip range ``[1, 1]``. ``apo_geo_mean`` is verl's ``geo_mean`` (GMPO, whose
#: ``clip_ratio_low/high`` bound log-ratios), ``apo_clip_cov`` and ``apo_kl_cov`` verl's ``clip_cov`` (PPO's clipped
#: surrogate without the dual clip) and ``kl_cov`` (PPO's unclipped one) on the tokens :mod:`.covariance` selects.
LOSS_MODES = {
    LOSS_MODE: {"policy_loss": "ppo"},
    "apo_cispo": {"policy_loss": "cispo"},
    "apo_sapo": {"policy_loss": "sapo"},
    "apo_gspo": {"policy_loss": "ppo", "importance_sampling_level": "sequence"},
    "apo_gpg": {"policy_loss": "cispo", "eps_low": 0.0, "eps_high": 0.0},
    "apo_dro": {"policy_loss": "dro"},
    "apo_dppo_tv": {"policy_loss": "dppo_tv"},
    "apo_dppo_kl": {"policy_loss": "dppo_kl"},
    "apo_geo_mean": {"policy_loss": "gmpo"},
    "apo_clip_cov": {"policy_loss": "ppo"},
    "apo_kl_cov": {"policy_loss": "ppo", "eps_low": 1.0, "eps_high": math.inf},
}
#: Loss modes whose tokens :mod:`.covariance` selects from the micro-batch's log-probs: the loss after the forward.
COVARIANCE_LOSS_MODES = ("apo_clip_cov", "apo_kl_cov")
#: Loss modes that read ``actor.clip_ratio_c``: vanilla's dual clip, DPPO's truncation of the weight.
CAPPED_LOSS_MODES = (LOSS_MODE, "apo_dppo_tv", "apo_dppo_kl")
#: Loss modes without PPO's ratio clip range: no clip fractions in their metrics.
UNCLIPPED_LOSS_MODES = ("apo_sapo", "apo_gpg", "apo_dro", "apo_dppo_tv", "apo_dppo_kl", "apo_kl_cov")
#: Environment variable selecting the KL aggregation (one of apo_kernels.AGG_MODES); unset: the actor's
#: ``loss_agg_mode``, as verl aggregates its KL loss. The released APO recipe uses ``seq-mean-token-mean``.
KL_AGG_MODE_ENV = "APO_VERL_KL_AGG_MODE"
#: verl's ``kl_loss_type`` names of the estimators the APO objective implements. verl's straight-through
#: variants (``k1+``, ``k3+``), ``abs`` and ``full`` have no APO counterpart.
KL_ESTIMATORS = {"kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2", "k2+": "k2", "low_var_kl": "k3", "k3": "k3"}


def loss_stage_config(actor_config: Any) -> APOConfig:
    """The loss-stage :class:`~apo_kernels.APOConfig` of verl's ``actor_rollout_ref.actor`` config.

    ``kl_loss_coef`` (0 without ``use_kl_loss``), ``kl_loss_type``, ``clip_ratio_low/high`` (default
    ``clip_ratio``), ``clip_ratio_c`` (verl always applies its dual clip), ``loss_agg_mode``,
    ``loss_scale_factor`` and ``entropy_coeff`` map one to one. The DADS/STCR fields are unused here:
    they acted in the group stage, whose results arrive as ``advantages`` and ``returns``.
    """
    kl_type = actor_config.kl_loss_type
    if kl_type not in KL_ESTIMATORS:
        raise ValueError(f"actor.kl_loss_type={kl_type!r} has no APO counterpart; use one of {sorted(KL_ESTIMATORS)}")
    clip = actor_config.clip_ratio
    loss_mode = actor_config.policy_loss.get("loss_mode")
    loss_mode = loss_mode if loss_mode in LOSS_MODES else LOSS_MODE
    policy_term = LOSS_MODES[loss_mode]
    dro_beta = actor_config.policy_loss.get("dro_beta") if loss_mode == "apo_dro" else None
    if loss_mode == "apo_dro" and not (dro_beta is not None and dro_beta > 0):
        raise ValueError(f"policy_loss.loss_mode=apo_dro needs actor.policy_loss.dro_beta > 0, got {dro_beta!r}")
    if policy_term["policy_loss"] == "sapo" and actor_config.loss_agg_mode != "seq-mean-token-mean":
        # verl's sapo aggregates its policy term seq-mean-token-mean whatever loss_agg_mode says (the entropy
        # term follows loss_agg_mode); APO aggregates both alike, so only this mode means the same loss.
        raise ValueError(
            "policy_loss.loss_mode=apo_sapo needs actor.loss_agg_mode='seq-mean-token-mean' (verl's SAPO policy "
            f"term always uses it), got {actor_config.loss_agg_mode!r}"
        )
    kl_agg_mode = os.environ.get(KL_AGG_MODE_ENV) or actor_config.loss_agg_mode
    if kl_agg_mode not in AGG_MODES:
        raise ValueError(f"${KL_AGG_MODE_ENV}={kl_agg_mode!r} must be one of {AGG_MODES}")
    fields = dict(
        beta=float(actor_config.kl_loss_coef) if actor_config.use_kl_loss else 0.0,
        kl_estimator=KL_ESTIMATORS[kl_type],
        sapo_tau_pos=float(actor_config.tau_pos),
        sapo_tau_neg=float(actor_config.tau_neg),
        eps_low=actor_config.clip_ratio_low if actor_config.clip_ratio_low is not None else clip,
        eps_high=actor_config.clip_ratio_high if actor_config.clip_ratio_high is not None else clip,
        clip_ratio_c=actor_config.clip_ratio_c if loss_mode in CAPPED_LOSS_MODES else None,
        dro_beta=dro_beta,
        loss_agg_mode=actor_config.loss_agg_mode,
        kl_agg_mode=kl_agg_mode,
        loss_agg_norm=actor_config.loss_scale_factor,
        entropy_coef=float(actor_config.entropy_coeff),
    )
    return APOConfig(**{**fields, **policy_term})


def _local_normalizers(data, mask: torch.Tensor):
    """``(num_tokens, num_sequences)`` of this micro-batch's share of verl's global normalizers.

    verl divides by the global token count / batch size and multiplies by ``dp_size`` so that averaging the
    gradients over data-parallel ranks gives the global mean; per rank that is a division by
    ``global / dp_size``. Without global counts (one rank), verl's seq-mean modes count only the sequences
    with at least one response token.
    """
    dp_size = data["dp_size"]
    batch_num_tokens = data["batch_num_tokens"]
    global_batch_size = data["global_batch_size"]
    if dp_size > 1 and (batch_num_tokens is None or global_batch_size is None):
        raise ValueError("batch_num_tokens and global_batch_size are required when dp_size > 1 (verl sets both)")
    num_tokens = None if batch_num_tokens is None else batch_num_tokens / dp_size
    if global_batch_size is None:
        num_sequences = mask.any(-1).sum().clamp(min=1)
    else:
        num_sequences = global_batch_size / dp_size
    return num_tokens, num_sequences


@dataclass
class ActorLossInputs:
    """One micro-batch's checked APO loss inputs, ``(B, R)`` over the responses as verl's ``no_padding_2_padding``
    lays out the model's log-probs; ``advantages`` carry the rollout IS weights."""

    config: APOConfig
    mask: torch.Tensor
    advantages: torch.Tensor
    #: verl's own: the covariance selections read them (:func:`covariance_terms`)
    batch_advantages: torch.Tensor
    rollout_is_weights: Optional[torch.Tensor]
    kl_weights: torch.Tensor
    old_logps: torch.Tensor
    ref_logps: Optional[torch.Tensor]
    num_tokens: Optional[float]
    num_sequences: Any
    #: verl's rule: a loss normalized by global counts is a partial sum over micro-batches (its metric too).
    globally_normalized: bool


def actor_loss_inputs(config: Any, data) -> ActorLossInputs:
    """The :class:`ActorLossInputs` of verl's ``ActorConfig`` and a micro-batch ``TensorDict`` (see
    :func:`apo_actor_loss`), every check of the adapter's loss here."""
    apo_config = loss_stage_config(config)
    if "returns" not in data:
        raise ValueError(
            "policy_loss.loss_mode=apo needs the DADS KL weights that algorithm.adv_estimator=apo stores in the "
            "batch's `returns`; set algorithm.adv_estimator=apo"
        )
    if apo_config.beta > 0 and "ref_log_prob" not in data:
        raise ValueError("actor.use_kl_loss=True needs `ref_log_prob` in the batch; enable the reference policy")

    fields = ["response_mask", "old_log_probs", "advantages", "returns"]
    fields += [name for name in ("rollout_is_weights", "ref_log_prob") if name in data]
    normalizers = {name: data[name] for name in ("dp_size", "batch_num_tokens", "global_batch_size")}
    batch = data.select(*fields).to_padded_tensor()
    mask = batch["response_mask"].bool()
    _check_dads_weights(batch["returns"], mask)

    advantages = batch["advantages"]
    if "rollout_is_weights" in batch and apo_config.policy_loss == "dro":
        raise ValueError(
            "policy_loss.loss_mode=apo_dro does not take rollout_is_weights (verl weights DRO's "
            "penalty too, which APO's advantage weighting cannot express); disable rollout correction"
        )
    is_weights = weights = batch.get("rollout_is_weights", None)
    if weights is not None:
        if bool((weights[mask] < 0).any()):
            raise ValueError("rollout_is_weights must be >= 0 (verl's truncated importance weights)")
        if apo_config.policy_loss == "gmpo":  # verl weights each sequence by its tokens' geometric mean weight
            lengths = mask.sum(-1)
            weights = torch.exp((torch.log(weights + 1e-10) * mask).sum(-1) / (lengths + 1e-8)).unsqueeze(-1)
        # verl multiplies each token's policy term by its IS weight; the term (dual clip included) is positively
        # homogeneous in A, so weighting the advantage instead gives the same loss and gradient.
        advantages = advantages * weights

    num_tokens, num_sequences = _local_normalizers(normalizers, mask)
    if apo_config.policy_loss == "gmpo":
        advantages = advantages * _geo_mean_policy_scale(mask, apo_config, num_tokens, num_sequences)
    return ActorLossInputs(
        config=apo_config,
        mask=mask,
        advantages=advantages,
        batch_advantages=batch["advantages"],
        rollout_is_weights=is_weights,
        kl_weights=batch["returns"],
        old_logps=batch["old_log_probs"],
        ref_logps=batch["ref_log_prob"] if apo_config.beta > 0 else None,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        globally_normalized=(
            normalizers["dp_size"] > 1
            or normalizers["batch_num_tokens"] is not None
            or normalizers["global_batch_size"] is not None
            or config.loss_scale_factor is not None
        ),
    )


def _geo_mean_policy_scale(mask: torch.Tensor, config: APOConfig, num_tokens, num_sequences) -> torch.Tensor:
    """verl's ``geo_mean`` averages its policy term over the micro-batch's rows, whatever ``loss_agg_mode`` and the
    global normalizers say (its entropy and KL terms follow them): ``(B, R)`` factors of the advantages, in which
    GMPO's term is linear, that turn APO's aggregation weight of each response token into that mean's."""
    m = mask.float()
    verl_weights = m / ((m.sum(-1, keepdim=True) + 1e-8) * mask.shape[0])
    apo_weights = aggregation_weights(
        m, config.loss_agg_mode, num_tokens=num_tokens, num_sequences=num_sequences, norm_len=config.loss_agg_norm
    )
    return torch.where(mask, verl_weights / apo_weights, 0.0)


def covariance_terms(actor_config: Any, inputs: ActorLossInputs, logps: torch.Tensor):
    """``(advantages, log_ratio_penalty, selected)`` of the policy term: for ``apo_clip_cov`` the advantages without
    the tokens :func:`.covariance.clip_cov_selection` takes out, for ``apo_kl_cov`` ``ppo_kl_coef |logp - old|`` (times
    the IS weight, as verl weights the whole term) on the tokens :func:`.covariance.kl_cov_selection` picks; other
    modes select nothing (``selected`` None)."""
    loss_mode = actor_config.policy_loss.get("loss_mode")
    if loss_mode not in COVARIANCE_LOSS_MODES:
        return inputs.advantages, None, None
    options = actor_config.policy_loss
    name = "clip_cov_ratio" if loss_mode == "apo_clip_cov" else "kl_cov_ratio"
    share = options.get(name)
    share = 0.0002 if share is None else share  # verl's default
    if not share > 0:
        raise ValueError(f"policy_loss.loss_mode={loss_mode} needs actor.policy_loss.{name} > 0, got {share!r}")
    mask, config = inputs.mask, inputs.config
    if loss_mode == "apo_clip_cov":
        bounds = [options.get(key) for key in ("clip_cov_lb", "clip_cov_ub")]
        selected = clip_cov_selection(
            logps,
            inputs.old_logps,
            inputs.batch_advantages,
            mask,
            eps_low=config.eps_low,
            eps_high=config.eps_high,
            share=share,
            lower=1.0 if bounds[0] is None else bounds[0],
            upper=5.0 if bounds[1] is None else bounds[1],
        )
        return inputs.advantages * ~selected, None, selected
    selected = kl_cov_selection(logps, inputs.batch_advantages, mask, share=share)
    coef = options.get("ppo_kl_coef")
    penalty = (1.0 if coef is None else coef) * selected.to(logps.dtype)
    if inputs.rollout_is_weights is not None:
        penalty = penalty * inputs.rollout_is_weights
    return inputs.advantages, penalty, selected


class ForwardLoss:
    """The APO loss of an update micro-batch, computed in the fused forward's vocabulary sweep (one pass).

    The engine's ``forward_step`` attaches it to the micro-batch (``FORWARD_LOSS_KEY``) with the actor's config,
    ``prepare_model_inputs`` adds the micro-batch's inputs and passes it to the model, whose fused forward runs
    :func:`apo_kernels.apo_loss`, keeps its ``output`` (the metrics) and returns the loss as a model output, which
    ``prepare_model_outputs`` hands on as ``model_output["apo_loss"]``; :func:`apo_actor_loss` returns it.

    Not a dataclass: FSDP2's forward hook rebuilds dataclass arguments (``dataclasses.replace``, its tensors cast
    to the mixed-precision dtype), so the forward would fill a copy; other objects pass through as they are.
    """

    def __init__(self, actor_config: Any, sweep: str):
        self.actor_config = actor_config
        self.sweep = sweep
        self.inputs: Optional[ActorLossInputs] = None
        self.rows: Optional[torch.Tensor] = None  # (B, R) packed positions whose labels are the responses' tokens
        self.output: Optional[APOOutput] = None


#: Non-tensor key of the micro-batch that carries a :class:`ForwardLoss`.
FORWARD_LOSS_KEY = "apo_forward_loss"


def apo_actor_loss(config: Any, model_output: dict, data, dp_group=None) -> tuple[torch.Tensor, dict]:
    """APO loss of one micro-batch, with the signature of verl's ``ppo_loss``.

    Args:
        config: verl's ``ActorConfig`` (see :func:`loss_stage_config`).
        model_output: the engine's output: nested ``log_probs`` (and ``entropy``) over prompt + response.
        data: the micro-batch ``TensorDict``: ``response_mask``, ``old_log_probs``, ``advantages``,
            ``returns`` (the DADS KL weights), ``ref_log_prob`` when the KL term is on, optionally
            ``rollout_is_weights``, and verl's normalizers ``dp_size``, ``batch_num_tokens``, ``global_batch_size``;
            with a :class:`ForwardLoss` (``FORWARD_LOSS_KEY``), the loss the forward computed in one pass.
        dp_group: unused (the normalizers already account for data parallelism).

    Returns:
        ``(loss, metrics)`` as verl's ``ppo_loss`` returns them.
    """
    forward_loss = tu.get_non_tensor_data(data, FORWARD_LOSS_KEY, None)
    if forward_loss is not None:
        if forward_loss.output is None or "apo_loss" not in model_output:
            raise RuntimeError(
                "the update micro-batch asked for the APO loss in the fused forward, but the model's forward is not "
                "the apo backend's (fused_kernel_options.impl_backend=apo)"
            )
        inputs, out = forward_loss.inputs, forward_loss.output
        # the sweep computed the entropy anyway; logged, as in two passes, when verl asked for it, so that every
        # micro-batch and rank logs the same keys (verl's data-parallel aggregation requires it)
        entropy_logged = bool(tu.get_non_tensor_data(data, "calculate_entropy", False))
        return model_output["apo_loss"], actor_metrics(config, inputs, out.metrics, entropy_logged)

    inputs = actor_loss_inputs(config, data)
    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    entropy = model_output.get("entropy", None)
    if entropy is not None:
        entropy = no_padding_2_padding(entropy, data)
    advantages, log_ratio_penalty, selected = covariance_terms(config, inputs, log_prob)
    loss, metrics = apo_objective(
        log_prob,
        inputs.mask,
        advantages,
        log_ratio_penalty=log_ratio_penalty,
        entropy=entropy,
        kl_weights=inputs.kl_weights,
        old_logps=inputs.old_logps,
        ref_logps=inputs.ref_logps,
        config=inputs.config,
        num_tokens=inputs.num_tokens,
        num_sequences=inputs.num_sequences,
    )
    metrics["one_pass"] = torch.zeros((), dtype=loss.dtype)
    if selected is not None:  # verl's pg_clipfrac for clip_cov
        metrics["cov_selected_frac"] = selected.sum() / inputs.mask.sum().clamp(min=1)
    return loss, actor_metrics(config, inputs, metrics, entropy_logged=entropy is not None)


def actor_metrics(config: Any, inputs: ActorLossInputs, metrics: dict, entropy_logged: bool) -> dict:
    """verl's metrics of the APO loss: ``actor/pg_loss`` aggregated as verl's ``ppo_loss`` aggregates it, the
    objective's metrics as ``actor/apo/*`` (``one_pass``: whether the forward's sweep computed the gradients), and
    DADS's weights when the KL term is on."""
    values = {name: value.item() for name, value in metrics.items()}
    if not entropy_logged:  # verl asked for none (entropy_coeff=0): a 0 would read as a collapsed policy
        del values["entropy"]
    if config.policy_loss.get("loss_mode") in UNCLIPPED_LOSS_MODES:
        values = {name: value for name, value in values.items() if not name.startswith("clip_frac")}
    out_metrics = Metric.from_dict(
        {f"actor/apo/{name}": value for name, value in values.items() if name != "pg_loss"},
        aggregation=AggregationType.MEAN,
    )
    loss_aggregation = AggregationType.SUM if inputs.globally_normalized else AggregationType.MEAN
    out_metrics["actor/pg_loss"] = Metric(value=values["pg_loss"], aggregation=loss_aggregation)
    out_metrics["kl_coef"] = inputs.config.beta
    if inputs.config.beta > 0:  # without the KL term the weights act on nothing
        out_metrics.update(
            Metric.from_dict(
                dads_weight_metrics(inputs.kl_weights, inputs.mask),
                aggregation=AggregationType.MEAN,
            )
        )
    return out_metrics


def _check_dads_weights(kl_weights: torch.Tensor, mask: torch.Tensor) -> None:
    """DADS's weights lie in (0, 1]. verl's trainers write ``returns`` whatever the estimator, so other values on
    the response mask mean another estimator filled it (GRPO's returns are its advantages, GAE's value targets):
    read as KL weights, a negative one would turn the KL penalty into a reward."""
    weights = kl_weights[mask]
    outside = (weights <= 0) | (weights > 1) | weights.isnan()
    if bool(outside.any()):
        raise ValueError(
            f"policy_loss.loss_mode=apo reads DADS KL weights in (0, 1] from the batch's `returns`, found "
            f"{weights[outside][0].item()}: another advantage estimator wrote them (GRPO's and GAE's returns are "
            "advantages or value targets); set algorithm.adv_estimator=apo"
        )


def dads_weight_metrics(kl_weights: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """DADS's KL weight per response of the micro-batch (the estimator writes it on every response token), mean and
    spread, as ``GroupAdvantages.metrics()`` names them for TRL.

    verl averages each metric over the micro-batches and requires the same keys, and as many values, from every
    data-parallel rank, so every micro-batch logs both, 0 without a response (verl's own masked means read 0 there:
    its padding samples can fill a micro-batch). TRL's ``positive_mean`` is not logged: micro-batches often hold no
    positive response, and a mean of per-micro-batch means over those that do is not the batch's."""
    rows = mask.any(dim=1)
    lam = (kl_weights.double() * mask).sum(dim=1)[rows] / mask.sum(dim=1)[rows]
    mean, std = (lam.mean().item(), lam.std(unbiased=False).item()) if lam.numel() else (0.0, 0.0)
    return {"actor/apo/dads_weight/mean": mean, "actor/apo/dads_weight/std": std}


def apo_policy_loss_unavailable(*args, **kwargs):
    """Registered under every name of ``LOSS_MODES`` (:func:`register_policy_losses`) so verl knows them;
    reached only when verl's own ``ppo_loss`` runs."""
    raise ValueError(
        "policy_loss.loss_mode=apo reached verl's own ppo_loss, which cannot apply APO's per-sample KL weights. "
        "Import apo_kernels.integrations.verl in every Ray worker (VERL_USE_EXTERNAL_MODULES, see "
        "examples/verl/run_qwen2_5_vl_3b_apo.sh) and do not combine APO with distillation, whose loss calls "
        "verl's ppo_loss directly"
    )


def register_policy_losses() -> None:
    """Register every ``LOSS_MODES`` name in verl's policy-loss registry, so that verl accepts it as
    ``policy_loss.loss_mode`` (idempotent; called by :func:`apo_kernels.integrations.verl.install`)."""
    for mode in LOSS_MODES:
        register_policy_loss(mode)(apo_policy_loss_unavailable)


def ppo_loss_with_apo(config: Any, model_output: dict, data, dp_group=None):
    """verl's actor loss with APO behind ``policy_loss.loss_mode=apo`` (or another ``LOSS_MODES`` name); other modes run
    verl's ``ppo_loss``."""
    if config.policy_loss.get("loss_mode", "vanilla") in LOSS_MODES:
        return apo_actor_loss(config, model_output, data, dp_group)
    return verl_ppo_loss(config, model_output, data, dp_group)
