"""verl's token selections by the covariance of log-prob and advantage (``clip_cov``, ``kl_cov``; "The Entropy
Mechanism of Reinforcement Learning for Reasoning Language Models", arXiv 2505.22617).

Each token's centred covariance ``(A - mean A) (logp - mean logp)``, the means over the micro-batch's response
tokens, picks the tokens whose policy term changes: ``clip_cov`` drops a random share of those with a covariance in
``(clip_cov_lb, clip_cov_ub)`` whose surrogate PPO did not already clip, ``kl_cov`` adds a ``|logp - old|`` penalty to
the share with the largest covariances. Both read the current log-probs of the whole micro-batch, so the loss comes
after the forward (two passes). The selections here are verl 0.9's (``compute_policy_loss_clip_cov``/``_kl_cov``),
random draws included: the same tokens for the same seed.
"""

from __future__ import annotations

import torch
from verl.utils.torch_functional import masked_mean


def clip_cov_selection(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    share: float,
    lower: float,
    upper: float,
) -> torch.Tensor:
    """``(B, R)`` bool: the tokens ``clip_cov`` takes out of the policy term, ``max(int(share * n), 1)`` of the ``n``
    response tokens at most, drawn with ``torch.randperm`` (the default generator, as verl draws) among those whose
    covariance lies in ``(lower, upper)`` and whose ratio PPO's clip range did not already clip."""
    logps = logps.detach()
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - eps_low, 1 + eps_high)
    covariance = (advantages - masked_mean(advantages, mask)) * (logps - masked_mean(logps, mask))
    candidates = mask & ~(clipped > unclipped) & (covariance > lower) & (covariance < upper)
    positions = torch.nonzero(candidates)
    selected = torch.zeros_like(mask)
    if len(positions) > 0:
        count = max(int(share * mask.sum().item()), 1)
        positions = positions[torch.randperm(len(positions))[:count]]
        selected[positions[:, 0], positions[:, 1]] = True
    return selected


def kl_cov_selection(
    logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, share: float
) -> torch.Tensor:
    """``(B, R)`` bool: the ``max(1, int(share * n))`` response tokens with the largest covariance (``torch.topk``
    over the ``n`` response tokens in row-major order, on the CPU, as verl ranks them), which ``kl_cov`` penalizes."""
    positions = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
    selected = torch.zeros_like(mask)
    if len(positions) == 0:
        return selected
    adv = advantages[mask].detach().reshape(-1).cpu()
    logp = logps[mask].detach().reshape(-1).cpu()
    covariance = (adv - adv.mean()) * (logp - logp.mean())
    top = torch.topk(covariance, max(1, int(len(covariance) * share)), largest=True).indices
    selected.view(-1)[positions[top.to(positions.device)]] = True
    return selected
