"""Group stage of APO: advantages with STCR, and DADS KL weights (once per rollout batch, no gradient)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .inputs import group_advantages_checks
from .config import APOConfig


@dataclass(frozen=True)
class GroupAdvantages:
    """Per-response results of the group stage, each shaped ``(B,)``.

    Attributes:
        advantages: group-normalized advantages, STCR-amplified for long wrong answers.
        kl_weights: DADS weight ``lambda`` of each response's KL term (1 where DADS does not apply).
        difficulty: ``d = 1 - K / G``, the share of wrong answers in the response's group.
        stcr_weights: STCR weight ``w`` (the advantage was multiplied by ``1 + w``; 0 where STCR did not apply).
        dads, stcr: whether DADS and STCR were on (their weights are constant otherwise).
    """

    advantages: torch.Tensor
    kl_weights: torch.Tensor
    difficulty: torch.Tensor
    stcr_weights: torch.Tensor
    dads: bool = True
    stcr: bool = True

    def metrics(self) -> dict[str, torch.Tensor]:
        """What the group stage did to a rollout batch, as float64 scalars (trainers log them per step):

        - ``difficulty/mean``: the mean share of wrong answers in each response's group; ``correct_frac``:
          the share of responses counted correct (the ``correct`` the stage was given: in the adapters, a
          total weighted reward >= the threshold, not an accuracy reward);
        - with DADS on: ``dads_weight/mean``, ``dads_weight/std``: the KL weights ``lambda`` over all responses
          (1 where DADS does not apply), and ``dads_weight/positive_mean`` over positive advantages (when any);
        - with STCR on: ``stcr_weight/mean``, ``stcr_frac``: ``w`` and the share of responses STCR amplified;
          ``stcr/negative_frac``: the share of negative advantages it amplified (when any);
          ``stcr/scale_mean``: the mean factor ``1 + w`` of those it amplified (when any);
        - ``advantages/mean``, ``advantages/std``, ``advantages/min``, ``advantages/max``.
        """
        adv, lam, w = self.advantages.double(), self.kl_weights.double(), self.stcr_weights.double()
        std = lambda x: x.std(unbiased=False)  # (one response: 0, not NaN)
        difficulty = self.difficulty.double().mean()
        scaled, positive, negative = w > 0, adv > 0, adv < 0
        out = {
            "difficulty/mean": difficulty,
            "correct_frac": 1.0 - difficulty,  # each response weighs its group's share: the overall share
            "advantages/mean": adv.mean(),
            "advantages/std": std(adv),
            "advantages/min": adv.min(),
            "advantages/max": adv.max(),
        }
        if self.dads:
            out["dads_weight/mean"], out["dads_weight/std"] = lam.mean(), std(lam)
            if bool(positive.any()):
                out["dads_weight/positive_mean"] = lam[positive].mean()
        if self.stcr:
            out["stcr_weight/mean"], out["stcr_frac"] = w.mean(), scaled.double().mean()
            if bool(negative.any()):
                out["stcr/negative_frac"] = (scaled & negative).double().sum() / negative.double().sum()
            if bool(scaled.any()):
                out["stcr/scale_mean"] = (1.0 + w[scaled]).mean()
        return out


def dads_weight(difficulty: torch.Tensor, config: APOConfig) -> torch.Tensor:
    """``f(d)``: 1 at ``d`` = 0 or 1, else the configured variant of the DADS curve."""
    s = config.dads_scale
    if config.dads_variant == "accuracy":
        f = -torch.expm1(-s * (1.0 - difficulty))
    else:
        f = torch.exp(-s * difficulty)
    return torch.where((difficulty == 0) | (difficulty == 1), torch.ones_like(f), f)


def _group_index(batch: int, group_size, group_ids, device) -> torch.Tensor:
    """Dense group index in ``[0, num_groups)`` for each response."""
    if group_size is not None:
        return torch.arange(batch, device=device) // group_size
    return torch.unique(group_ids, return_inverse=True)[1]


@torch.no_grad()
def group_advantages(
    rewards: torch.Tensor,
    *,
    group_size: Optional[int] = None,
    group_ids: Optional[torch.Tensor] = None,
    correct: Optional[torch.Tensor] = None,
    lengths: Optional[torch.Tensor] = None,
    config: APOConfig = APOConfig(),
) -> GroupAdvantages:
    """Advantages, STCR weights and DADS KL weights of a rollout batch.

    Args:
        rewards: ``(B,)`` scalar reward of each response.
        group_size: responses per prompt when groups are contiguous (``B`` must be a multiple).
        group_ids: ``(B,)`` integer prompt id of each response, in any order (instead of ``group_size``).
        correct: ``(B,)`` bool (or 0/1) correctness; defaults to ``rewards >= 1`` (accuracy 1 + format 0.5).
        lengths: ``(B,)`` response lengths in tokens; required when ``config.stcr``.
        config: the APO configuration.

    Returns:
        A :class:`GroupAdvantages` of ``(B,)`` tensors in ``rewards``' dtype (float32 for non-float rewards).
    """
    group_advantages_checks(
        rewards, group_size=group_size, group_ids=group_ids, correct=correct, lengths=lengths, config=config
    )
    batch = rewards.shape[0]
    out_dtype = rewards.dtype if rewards.dtype in (torch.float32, torch.float64) else torch.float32
    r = rewards.double()
    group = _group_index(batch, group_size, group_ids, rewards.device)
    c = (r >= 1).double() if correct is None else correct.double()

    num_groups = int(group.max()) + 1

    def per_group(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, group, x)

    size = per_group(torch.ones_like(r))
    mean = per_group(r) / size
    centred = r - mean[group]
    if config.scale_rewards and config.reward_std == "batch":
        spread = r.std() if batch > 1 else torch.zeros((), dtype=r.dtype, device=r.device)  # unbiased, as TRL
        adv = centred / (spread + config.adv_eps)
    elif config.scale_rewards:
        # A single-response group (e.g. evaluation with one sample) has no spread: its std counts as 0,
        # and its advantage, r - mean = 0, stays 0.
        std = (per_group(centred * centred) / (size - 1).clamp(min=1)).sqrt()
        adv = torch.where(size[group] > 1, centred / (std[group] + config.adv_eps), torch.zeros_like(centred))
    else:
        adv = centred

    n_correct = per_group(c)
    difficulty = 1.0 - n_correct[group] / size[group]

    stcr_w = torch.zeros_like(r)
    if config.stcr:
        length = lengths.double()
        mean_correct_len = per_group(c * length) / n_correct.clamp(min=1)
        excess = length - mean_correct_len[group]
        applies = (n_correct[group] > 0) & (c == 0) & (excess > 0)
        # w = 1 - base ** -excess, written with expm1 so tiny excesses keep their precision
        stcr_w = torch.where(applies, -torch.expm1(-excess * math.log(config.stcr_base)), stcr_w)
        adv = (1.0 + stcr_w) * adv

    kl_w = torch.ones_like(r)
    if config.dads:
        positive = adv > 0 if config.positive_by == "advantage" else c == 1
        kl_w = torch.where(positive, dads_weight(difficulty, config), kl_w)

    return GroupAdvantages(
        advantages=adv.to(out_dtype),
        kl_weights=kl_w.to(out_dtype),
        difficulty=difficulty.to(out_dtype),
        stcr_weights=stcr_w.to(out_dtype),
        dads=config.dads,
        stcr=config.stcr,
    )
