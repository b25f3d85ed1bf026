"""The APO group stage as a verl advantage estimator, ``algorithm.adv_estimator=apo`` (registered by
:func:`register_estimator`, which the package's ``install()`` calls).

verl's estimator contract is ``fn(token_level_rewards, response_mask, index=uids, config=algorithm) ->
(advantages, returns)``, and both trainers (legacy and v1) write exactly those two ``(B, T)`` tensors into
the batch the actor trains on. APO has no critic, so ``returns`` is free: it carries the per-response DADS
KL weight ``lambda`` (broadcast over the response tokens), which :mod:`.loss` reads back. The only visible
side effect is that verl logs ``critic/returns/*`` as the statistics of ``lambda``.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from verl.trainer.ppo.core_algos import register_adv_est

from apo_kernels import APOConfig, group_advantages

ESTIMATOR_NAME = "apo"
#: APOConfig fields of the group stage that ``algorithm.apo.<field>`` may set (scale_rewards comes from
#: verl's own ``algorithm.norm_adv_by_std_in_grpo``).
GROUP_STAGE_FIELDS = ("dads", "dads_variant", "dads_scale", "stcr", "stcr_base", "positive_by", "adv_eps")


def group_stage_config(algorithm_config: Optional[Any]) -> APOConfig:
    """The group-stage :class:`~apo_kernels.APOConfig` of verl's ``algorithm`` config section.

    Reads ``algorithm.apo`` (add it on the command line as ``+algorithm.apo.stcr_base=1.00001``) and
    ``algorithm.norm_adv_by_std_in_grpo`` (False: Dr.GRPO advantages, no std scaling).
    """
    if algorithm_config is None:
        return APOConfig()
    options = algorithm_config.get("apo", None) or {}
    unknown = sorted(set(options) - set(GROUP_STAGE_FIELDS))
    if unknown:
        raise ValueError(f"algorithm.apo accepts only {GROUP_STAGE_FIELDS}, got unknown keys {unknown}")
    scale_rewards = bool(algorithm_config.get("norm_adv_by_std_in_grpo", True))
    return APOConfig(scale_rewards=scale_rewards, **{key: options[key] for key in options})


def uid_group_ids(uids) -> torch.Tensor:
    """Dense integer group ids from verl's ``uid`` array (one string per response, shared within a prompt)."""
    uids = np.asarray(uids, dtype=object)
    if uids.ndim != 1:
        raise ValueError(f"index (verl's uid) must be a 1-D array with one id per response, got shape {uids.shape}")
    return torch.from_numpy(np.unique(uids.astype(str), return_inverse=True)[1].reshape(-1).astype(np.int64))


def compute_apo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Optional[np.ndarray] = None,
    config: Optional[Any] = None,
    **_other_batch_fields,
) -> tuple[torch.Tensor, torch.Tensor]:
    """APO advantages (with STCR) and DADS KL weights of a verl rollout batch.

    Args:
        token_level_rewards: ``(B, T)`` rewards; a response's reward is their sum (outcome reward).
        response_mask: ``(B, T)`` response mask; its row sums are the response lengths STCR compares.
        index: verl's ``uid`` of each response (the prompt it was sampled for): the groups.
        config: verl's ``algorithm`` config (see :func:`group_stage_config`).
        _other_batch_fields: optional fields verl passes to every estimator (e.g. reward_baselines), unused.

    Returns:
        ``(advantages, kl_weights)``, both ``(B, T)`` and zero outside the response mask; verl stores them as
        the batch's ``advantages`` and ``returns``.
    """
    if index is None:
        raise ValueError(
            "the APO estimator groups responses by verl's `uid` (index), which this batch lacks; "
            "run it through verl's trainer, which assigns one uid per prompt before rollout"
        )
    if token_level_rewards.dim() != 2 or token_level_rewards.shape != response_mask.shape:
        raise ValueError(
            "token_level_rewards and response_mask must both be (B, T), got "
            f"{tuple(token_level_rewards.shape)} and {tuple(response_mask.shape)}"
        )
    mask = response_mask.to(torch.float32)
    group = group_advantages(
        token_level_rewards.sum(-1).to(torch.float32),
        group_ids=uid_group_ids(index).to(token_level_rewards.device),
        lengths=mask.sum(-1),
        config=group_stage_config(config),
    )
    return group.advantages.unsqueeze(-1) * mask, group.kl_weights.unsqueeze(-1) * mask


def register_estimator() -> None:
    """Register :func:`compute_apo_advantage` as verl's ``algorithm.adv_estimator=apo`` (idempotent: verl
    accepts the same function again; called by :func:`apo_kernels.integrations.verl.install`)."""
    register_adv_est(ESTIMATOR_NAME)(compute_apo_advantage)
