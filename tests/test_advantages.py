"""Group stage against a brute-force loop written straight from the spec, in plain Python floats."""

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from apo_kernels import APOConfig, group_advantages


def brute_force(rewards, group_ids, correct, lengths, cfg):
    """Per response: (advantage, kl_weight, difficulty, stcr_weight), one group at a time."""
    out = [None] * len(rewards)
    n = len(rewards)
    batch_mean = sum(rewards) / n
    batch_std = math.sqrt(sum((r - batch_mean) ** 2 for r in rewards) / (n - 1)) if n > 1 else 0.0
    for g in sorted(set(group_ids)):
        members = [i for i, x in enumerate(group_ids) if x == g]
        size = len(members)
        rs = [rewards[i] for i in members]
        mean = sum(rs) / size
        std = math.sqrt(sum((r - mean) ** 2 for r in rs) / (size - 1)) if size > 1 else 0.0
        k = sum(correct[i] for i in members)
        d = 1 - k / size
        correct_lens = [lengths[i] for i in members if correct[i]]
        for i in members:
            a = rewards[i] - mean
            if cfg.scale_rewards:
                a /= (batch_std if cfg.reward_std == "batch" else std) + cfg.adv_eps
            w = 0.0
            if cfg.stcr and k > 0 and not correct[i]:
                lbar = sum(correct_lens) / len(correct_lens)
                if lengths[i] > lbar:
                    w = 1 - cfg.stcr_base ** (-(lengths[i] - lbar))
            a *= 1 + w
            lam = 1.0
            positive = a > 0 if cfg.positive_by == "advantage" else bool(correct[i])
            if cfg.dads and positive and d not in (0.0, 1.0):
                if cfg.dads_variant == "accuracy":
                    lam = 1 - math.exp(-cfg.dads_scale * (1 - d))
                else:
                    lam = math.exp(-cfg.dads_scale * d)
            out[i] = (a, lam, d, w)
    return out


@st.composite
def rollout_batches(draw):
    n_groups = draw(st.integers(1, 4))
    size = draw(st.integers(2, 8))
    rewards = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5]), min_size=n_groups * size, max_size=n_groups * size))
    lengths = draw(st.lists(st.integers(1, 400_000), min_size=len(rewards), max_size=len(rewards)))
    perm = draw(st.permutations(list(range(len(rewards)))))
    cfg = APOConfig(
        dads=draw(st.booleans()),
        stcr=draw(st.booleans()),
        dads_variant=draw(st.sampled_from(["accuracy", "difficulty"])),
        positive_by=draw(st.sampled_from(["advantage", "correct"])),
        scale_rewards=draw(st.booleans()),
        reward_std=draw(st.sampled_from(["group", "batch"])),
        stcr_base=draw(st.sampled_from([1.00001, 1.001, 1.5])),
        adv_eps=draw(st.sampled_from([1e-9, 1e-4])),
    )
    return n_groups, size, rewards, lengths, perm, cfg


@settings(max_examples=150)
@given(rollout_batches())
def test_matches_brute_force_with_groups_in_any_order(batch):
    n_groups, size, rewards, lengths, perm, cfg = batch
    group_ids = [i // size for i in range(len(rewards))]
    # shuffle the responses: groups given by ids, not contiguity
    rewards, lengths, group_ids = ([x[p] for p in perm] for x in (rewards, lengths, group_ids))
    correct = [r >= 1 for r in rewards]
    expected = brute_force(rewards, group_ids, correct, lengths, cfg)
    got = group_advantages(
        torch.tensor(rewards, dtype=torch.float64),
        group_ids=torch.tensor(group_ids) * 7 + 3,  # ids need not be dense
        lengths=torch.tensor(lengths),
        config=cfg,
    )
    for field, column in zip(("advantages", "kl_weights", "difficulty", "stcr_weights"), zip(*expected)):
        torch.testing.assert_close(
            getattr(got, field), torch.tensor(column, dtype=torch.float64), rtol=1e-9, atol=1e-12
        )


def test_contiguous_groups_equal_ids():
    torch.manual_seed(0)
    rewards = torch.randint(0, 4, (24,)).float() / 2
    lengths = torch.randint(1, 100, (24,))
    a = group_advantages(rewards, group_size=8, lengths=lengths)
    b = group_advantages(rewards, group_ids=torch.arange(24) // 8, lengths=lengths)
    for field in ("advantages", "kl_weights", "difficulty", "stcr_weights"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert a.advantages.dtype == torch.float32


def test_dads_weights_for_groups_of_eight_match_the_spec_table():
    # spec: for G = 8, K = 1..7 correct gives lambda = 0.288, 0.493, 0.639, 0.743, 0.817, 0.870, 0.907
    table = [0.288, 0.493, 0.639, 0.743, 0.817, 0.870, 0.907]
    for k, expected in enumerate(table, start=1):
        rewards = torch.tensor([1.0] * k + [0.0] * (8 - k))
        out = group_advantages(rewards, group_size=8, config=APOConfig(stcr=False))
        assert out.kl_weights[:k] == pytest.approx([expected] * k, abs=5e-4)
        assert torch.all(out.kl_weights[k:] == 1)  # negatives keep the full KL weight


def test_stcr_amplifies_only_long_wrong_answers():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0])
    lengths = torch.tensor([100, 200, 120, 5000])  # mean correct length 150
    out = group_advantages(rewards, group_size=4, lengths=lengths, config=APOConfig(dads=False))
    plain = group_advantages(rewards, group_size=4, lengths=lengths, config=APOConfig(dads=False, stcr=False))
    assert out.stcr_weights.tolist() == [0.0, 0.0, 0.0, pytest.approx(1 - 1.00001**-4850)]
    assert out.advantages[:3].tolist() == pytest.approx(plain.advantages[:3].tolist())
    assert out.advantages[3] < plain.advantages[3] < 0


def test_all_correct_and_all_wrong_groups():
    out = group_advantages(torch.tensor([1.5, 1.5, 0.0, 0.0]), group_size=2, lengths=torch.tensor([3, 9, 3, 9]))
    assert torch.all(out.advantages == 0)
    assert out.difficulty.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert torch.all(out.kl_weights == 1) and torch.all(out.stcr_weights == 0)


def test_single_response_groups_get_zero_advantage():
    out = group_advantages(torch.tensor([1.0, 0.0, 1.5]), group_size=1, config=APOConfig(stcr=False, adv_eps=1e-300))
    assert out.advantages.tolist() == [0.0, 0.0, 0.0]
    assert out.difficulty.tolist() == [0.0, 1.0, 0.0] and out.kl_weights.tolist() == [1.0, 1.0, 1.0]


def test_correct_can_be_given_explicitly():
    rewards = torch.tensor([0.9, 0.1, 0.1, 0.1])
    out = group_advantages(rewards, group_size=4, correct=torch.tensor([1, 0, 0, 0]), config=APOConfig(stcr=False))
    assert out.difficulty[0] == pytest.approx(0.75)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(group_size=3), ValueError, "group_size=3 does not divide"),
        (dict(), ValueError, "exactly one of group_size"),
        (dict(group_size=2, group_ids=torch.zeros(4, dtype=torch.long)), ValueError, "exactly one of group_size"),
        (dict(group_ids=torch.zeros(3, dtype=torch.long)), ValueError, "group_ids must have shape"),
        (dict(group_ids=torch.zeros(4)), TypeError, "group_ids must have an integer dtype"),
        (dict(group_size=2, lengths=None), ValueError, "lengths is required"),
        (dict(group_size=2, correct=torch.tensor([0, 2, 1, 0])), ValueError, "correct must hold only 0/1"),
        (dict(group_size=2, lengths=torch.tensor([1, -2, 3, 4])), ValueError, "lengths must lie in"),
        (dict(group_size=2, config="grpo"), TypeError, "config must be an APOConfig"),
    ],
)
def test_bad_input_is_rejected_naming_the_argument(kwargs, error, match):
    kwargs = {"lengths": torch.tensor([1, 2, 3, 4]), **kwargs}
    with pytest.raises(error, match=match):
        group_advantages(torch.tensor([1.0, 0.0, 1.5, 0.5]), **kwargs)


def test_non_finite_rewards_are_rejected():
    with pytest.raises(ValueError, match="rewards contains NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), group_size=2, config=APOConfig(stcr=False))


def test_metrics_summarize_the_group_stage():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.5, 0.0, 0.5, 1.0, 0.0])
    lengths = torch.tensor([10, 30, 5, 12, 8, 50, 40, 7])  # the 0.5 (wrong, above its group mean) is long
    stage = group_advantages(rewards, group_size=4, lengths=lengths, config=APOConfig())
    metrics = {name: value.item() for name, value in stage.metrics().items()}
    adv, lam, w, d = (x.tolist() for x in (stage.advantages, stage.kl_weights, stage.stcr_weights, stage.difficulty))
    negatives = [i for i, a in enumerate(adv) if a < 0]
    scaled = [i for i, x in enumerate(w) if x > 0]
    assert scaled and any(x != 1 for x in lam)  # both APO parts act on this batch
    assert set(scaled) - set(negatives)  # STCR also amplified a positive advantage (a wrong answer above its mean)
    expected = {
        "difficulty/mean": statistics.fmean(d),
        "correct_frac": statistics.fmean(float(r >= 1) for r in rewards.tolist()),
        "dads_weight/mean": statistics.fmean(lam),
        "dads_weight/std": statistics.pstdev(lam),
        "dads_weight/positive_mean": statistics.fmean(x for x, a in zip(lam, adv) if a > 0),
        "stcr_weight/mean": statistics.fmean(w),
        "stcr_frac": len(scaled) / 8,
        "stcr/negative_frac": len(set(scaled) & set(negatives)) / len(negatives),
        "stcr/scale_mean": statistics.fmean(1 + w[i] for i in scaled),
        "advantages/mean": statistics.fmean(adv),
        "advantages/std": statistics.pstdev(adv),
        "advantages/min": min(adv),
        "advantages/max": max(adv),
    }
    assert metrics.keys() == expected.keys()
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


def test_metrics_without_positives_negatives_or_stcr_leave_those_out():
    stage = group_advantages(torch.ones(4), group_size=2, lengths=torch.tensor([3, 9, 4, 4]), config=APOConfig())
    metrics = stage.metrics()
    assert not {"dads_weight/positive_mean", "stcr/negative_frac", "stcr/scale_mean"} & metrics.keys()
    assert metrics["advantages/std"].item() == 0 and metrics["correct_frac"].item() == 1


@pytest.mark.parametrize("dads, stcr", [(True, False), (False, True), (False, False)])
def test_metrics_only_for_the_parts_that_are_on(dads, stcr):
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.5, 0.0, 0.5, 1.0, 0.0])
    lengths = torch.tensor([10, 30, 5, 12, 8, 50, 40, 7])
    metrics = group_advantages(rewards, group_size=4, lengths=lengths, config=APOConfig(dads=dads, stcr=stcr)).metrics()
    assert any(name.startswith("dads_weight/") for name in metrics) == dads
    assert any(name.startswith("stcr") for name in metrics) == stcr
    assert {"difficulty/mean", "correct_frac", "advantages/mean", "advantages/std"} <= metrics.keys()
