"""The registered ``apo`` estimator, called the way verl's trainer calls it, equals ``group_advantages``."""

import pytest

pytest.importorskip("verl")

import numpy as np
import torch
from omegaconf import OmegaConf
from verl import DataProto
from verl.trainer.ppo.core_algos import get_adv_estimator_fn
from verl.trainer.ppo.ray_trainer import compute_advantage

import apo_kernels.integrations.verl as apo_verl
from apo_kernels import APOConfig, group_advantages


def rollout_batch(seed=0, groups=3, group_size=4, length=9):
    """Interleaved groups (verl shuffles/balances batches), string uids, 0/1 accuracy + 0.5 format rewards."""
    gen = torch.Generator().manual_seed(seed)
    batch = groups * group_size
    order = torch.randperm(batch, generator=gen)
    uids = np.array([f"prompt-{i // group_size}-uuid" for i in order.tolist()], dtype=object)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    first_group = order < group_size
    lengths[first_group] = torch.tensor([2, length, length - 1, 3])  # wrong answers longer than right ones
    mask = (torch.arange(length) < lengths[:, None]).to(torch.int64)
    rewards = torch.randint(0, 2, (batch,), generator=gen).float() + 0.5 * torch.randint(0, 2, (batch,), generator=gen)
    rewards[first_group] = torch.tensor([1.5, 0.0, 0.5, 1.0])  # both sides, for STCR and DADS
    token_rewards = torch.zeros(batch, length)
    token_rewards[torch.arange(batch), lengths - 1] = rewards  # verl puts the outcome reward on the last token
    return token_rewards, mask, uids, rewards, lengths


def algorithm_config(**apo):
    return OmegaConf.create({"adv_estimator": "apo", "norm_adv_by_std_in_grpo": True, "apo": apo})


def expected(rewards, lengths, uids, config):
    ids = torch.tensor([int(u.split("-")[1]) for u in uids])
    return group_advantages(rewards, group_ids=ids, lengths=lengths, config=config)


@pytest.mark.parametrize("options", [{}, {"stcr_base": 1.05, "dads_variant": "difficulty"}, {"positive_by": "correct"}])
def test_estimator_equals_group_advantages(options):
    token_rewards, mask, uids, rewards, lengths = rollout_batch()
    advantages, returns = get_adv_estimator_fn("apo")(
        token_level_rewards=token_rewards, response_mask=mask, index=uids, config=algorithm_config(**options)
    )
    ref = expected(rewards, lengths, uids, APOConfig(**options))
    assert (ref.stcr_weights > 0).any() and (ref.kl_weights < 1).any()  # the case exercises STCR and DADS
    torch.testing.assert_close(advantages, ref.advantages[:, None] * mask, rtol=0, atol=0)
    torch.testing.assert_close(returns, ref.kl_weights[:, None] * mask, rtol=0, atol=0)


def test_verl_compute_advantage_stores_kl_weights_in_the_batch():
    """Through verl's own trainer function: advantages and the DADS weights (as `returns`) land in the batch."""
    token_rewards, mask, uids, rewards, lengths = rollout_batch(seed=1)
    data = DataProto.from_dict(
        tensors={"token_level_rewards": token_rewards, "response_mask": mask}, non_tensors={"uid": uids}
    )
    config = algorithm_config()
    config.norm_adv_by_std_in_grpo = False
    out = compute_advantage(data, adv_estimator=config.adv_estimator, num_repeat=4, config=config)
    ref = expected(rewards, lengths, uids, APOConfig(scale_rewards=False))
    torch.testing.assert_close(out.batch["advantages"], ref.advantages[:, None] * mask, rtol=0, atol=0)
    torch.testing.assert_close(out.batch["returns"], ref.kl_weights[:, None] * mask, rtol=0, atol=0)


def test_uids_map_to_groups_in_any_order():
    ids = apo_verl.uid_group_ids(np.array(["b", "a", "b", "c", "a"], dtype=object))
    assert ids.dtype == torch.int64 and ids.tolist() == [1, 0, 1, 2, 0]


def test_actionable_errors():
    token_rewards, mask, uids, _, _ = rollout_batch()
    estimator = get_adv_estimator_fn("apo")
    with pytest.raises(ValueError, match="uid"):
        estimator(token_level_rewards=token_rewards, response_mask=mask, config=algorithm_config())
    with pytest.raises(ValueError, match="unknown keys \\['beta'\\]"):
        estimator(token_level_rewards=token_rewards, response_mask=mask, index=uids, config=algorithm_config(beta=1))
    with pytest.raises(ValueError, match="APOConfig.stcr_base"):
        estimator(
            token_level_rewards=token_rewards, response_mask=mask, index=uids, config=algorithm_config(stcr_base=1)
        )
