"""verl 0.9.1's real ``ActorRolloutRefWorker`` trains with the adapter as the recipe configures it (``worker_e2e.py``):
init, old and reference log-probs, the APO estimator through the v1 trainer's ``_compute_advantage``, the update.

The references are verl's own: its unfused ``vanilla`` loss with its k3 KL (equal to APO without DADS and STCR),
and the same run on one rank instead of two. Each configuration is one launch of ``worker_e2e.run``, compared here.
"""

import math

import pytest

pytest.importorskip("verl")

from tests.integrations.verl import worker_e2e  # noqa: E402

APO_WITHOUT_DADS_STCR = ("algorithm.apo.dads=False", "algorithm.apo.stcr=False")
# verl's KL loss is aggregated like its policy term (token-mean in the recipe); APO's follows this variable.
TOKEN_MEAN_KL = {"APO_VERL_KL_AGG_MODE": "token-mean"}
VERL_VANILLA_UNFUSED = (
    "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla",
    "actor_rollout_ref.model.use_fused_kernels=False",
)
# The update's loss after the forward, from its log-probs (verl's order); by default the fused forward computes it.
TWO_PASSES = ("+actor_rollout_ref.model.fused_kernel_options.sweep=two-pass",)
ONE_MINI_BATCH = ("actor_rollout_ref.actor.ppo_mini_batch_size=2",)  # the same samples per update on 1 or 2 ranks
# 6 samples: verl's batch padding appends 2 image-less samples, the update's last micro-batch on one rank.
PADDED_SAMPLES = 6
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def vl_apo():
    return worker_e2e.run("qwen2_5_vl", 1, APO_WITHOUT_DADS_STCR, TOKEN_MEAN_KL, PADDED_SAMPLES, num_steps=1)


@pytest.fixture(scope="module")
def vl_vanilla():
    overrides = APO_WITHOUT_DADS_STCR + VERL_VANILLA_UNFUSED
    return worker_e2e.run("qwen2_5_vl", 1, overrides, TOKEN_MEAN_KL, PADDED_SAMPLES, num_steps=1)


@pytest.fixture(scope="module")
def vl_apo_two_passes():
    overrides = APO_WITHOUT_DADS_STCR + TWO_PASSES
    return worker_e2e.run("qwen2_5_vl", 1, overrides, TOKEN_MEAN_KL, PADDED_SAMPLES, num_steps=1)


@pytest.fixture(scope="module")
def text_runs():
    """The recipe's APO (DADS and STCR on) on Qwen2, one and two ranks."""
    return {ranks: worker_e2e.run("qwen2", ranks, ONE_MINI_BATCH, num_steps=2) for ranks in (1, 2)}


def max_parameter_difference(run, other):
    assert run["parameters"].keys() == other["parameters"].keys()
    return max(
        abs(a - b) for name in run["parameters"] for a, b in zip(run["parameters"][name], other["parameters"][name])
    )


def assert_close_lists(values, expected, what):
    assert len(values) == len(expected), what
    for value, want in zip(values, expected):
        assert math.isclose(value, want, rel_tol=TOLERANCE, abs_tol=TOLERANCE), f"{what}: {values} vs {expected}"


def test_apo_without_dads_and_stcr_equals_verl_s_vanilla_loss_with_k3(vl_apo, vl_vanilla):
    assert vl_apo["loss_function"].endswith("ppo_loss_with_apo")  # the adapter's loss is what the worker bound
    assert any(name.startswith("actor/apo/") for name in vl_apo["steps"][0]["metrics"])  # and it ran
    assert not any(name.startswith("actor/apo/") for name in vl_vanilla["steps"][0]["metrics"])
    for step, reference in zip(vl_apo["steps"], vl_vanilla["steps"]):
        assert_close_lists(step["grad_norm"], reference["grad_norm"], "grad norms per mini-batch")
        assert_close_lists(step["loss"], reference["loss"], "losses per mini-batch")
    assert vl_apo["max_parameter_change"] > 100 * TOLERANCE  # the comparison below can tell updates apart
    assert max_parameter_difference(vl_apo, vl_vanilla) < TOLERANCE


def test_the_update_in_one_pass_equals_two_passes(vl_apo, vl_apo_two_passes):
    """Issue 24's one pass, in the real worker (FSDP2, float32): the same update as verl's order."""
    assert vl_apo["steps"][0]["metrics"]["actor/apo/one_pass"] == 1.0
    assert vl_apo_two_passes["steps"][0]["metrics"]["actor/apo/one_pass"] == 0.0
    for step, reference in zip(vl_apo["steps"], vl_apo_two_passes["steps"]):
        assert_close_lists(step["grad_norm"], reference["grad_norm"], "grad norms per mini-batch")
        assert_close_lists(step["loss"], reference["loss"], "losses per mini-batch")
    assert max_parameter_difference(vl_apo, vl_apo_two_passes) < TOLERANCE


def test_two_ranks_equal_one(text_runs):
    one, two = text_runs[1], text_runs[2]
    for step, reference in zip(two["steps"], one["steps"]):
        assert_close_lists(step["grad_norm"], reference["grad_norm"], "grad norms")
        # a partial sum over micro-batches and ranks (global normalizers); the actor/apo/* means are means of the
        # micro-batches' token means, which depend on how the ranks split the batch
        assert_close_lists([step["metrics"]["actor/pg_loss"]], [reference["metrics"]["actor/pg_loss"]], "pg_loss")
    assert max_parameter_difference(one, two) < TOLERANCE


def test_the_loss_sees_the_estimator_s_kl_weights_per_sample(text_runs):
    for run in text_runs.values():
        estimated = {}
        for step in run["steps"]:
            for sample in step["estimator_kl_weights"]:
                estimated.setdefault((sample["uid"], sample["session_id"]), set()).add(sample["weight"])
        assert all(len(weights) == 1 for weights in estimated.values())  # same rollout each step
        assert min(min(weights) for weights in estimated.values()) < 0.9  # DADS is on: not all ones
        seen = [sample for rank in run["loss_kl_weights_per_rank"] for micro in rank for sample in micro]
        assert len(seen) == len(estimated) * len(run["steps"])  # every sample, once per step, over the ranks
        for sample in seen:
            assert {sample["weight"]} == estimated[(sample["uid"], sample["session_id"])]


def test_qwen2_5_vl_trains_through_an_image_less_padding_micro_batch(vl_apo):
    step = vl_apo["steps"][0]
    assert step["samples"] == 8  # verl padded 6 to 8
    last_micro_batch = vl_apo["loss_kl_weights"][-1]
    assert all(sample["uid"].startswith("pad") and sample["weight"] is None for sample in last_micro_batch)
    assert all(math.isfinite(norm) for norm in step["grad_norm"])
    assert vl_apo["max_parameter_change"] > 0


def test_apo_loss_with_another_estimator_stops_with_a_clear_error():
    with pytest.raises(AssertionError, match=r"ValueError: .*set algorithm\.adv_estimator=apo"):
        worker_e2e.run("qwen2", 1, ("algorithm.adv_estimator=grpo",), num_steps=1)
