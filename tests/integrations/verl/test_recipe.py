"""The launch recipe's overrides compose with verl's own Hydra config, pass the checks ``main_ppo`` runs before
launching, and select the adapter's extensions; the verl extra installs what the launch imports."""

import pytest

pytest.importorskip("verl")

import importlib.metadata
from pathlib import Path

import torch

import apo_kernels.integrations.verl as apo_verl
from apo_kernels import APOConfig
from tests.integrations.verl.recipe import compose_recipe
from tests.integrations.verl.recipe import recipe_overrides as run_recipe_overrides


def recipe_overrides():
    """The recipe on 2 nodes with Ulysses over 2 GPUs (the multi-GPU settings the tests check)."""
    return run_recipe_overrides(MODEL="model", TRAIN="train", VAL="val", NNODES="2", SP="2")


def test_recipe_composes_with_verl_config():
    exported, overrides = recipe_overrides()
    assert exported["VERL_USE_EXTERNAL_MODULES"] == "apo_kernels.integrations.verl"
    config = compose_recipe(overrides)
    actor = config.actor_rollout_ref.actor
    assert config.algorithm.adv_estimator == apo_verl.ESTIMATOR_NAME
    assert actor.policy_loss.loss_mode == apo_verl.LOSS_MODE
    assert config.actor_rollout_ref.model.fused_kernel_options.impl_backend == apo_verl.BACKEND_NAME
    # the multi-GPU settings: FSDP2 workers, Ulysses sequence parallelism and nodes from the environment
    assert (actor.strategy, actor.ulysses_sequence_parallel_size, config.trainer.nnodes) == ("fsdp2", 2, 2)
    assert dict(config.ray_kwargs.ray_init.runtime_env.env_vars) == exported  # reaches every Ray worker
    # the released hyperparameters
    assert config.actor_rollout_ref.rollout.n == 8 and actor.optim.lr == 1e-6
    assert (actor.kl_loss_coef, actor.kl_loss_type, actor.clip_ratio_low, actor.clip_ratio_high) == (
        1e-3,
        "k3",
        0.2,
        0.2,
    )
    assert config.data.max_response_length == 4096
    assert apo_verl.group_stage_config(config.algorithm) == APOConfig()


def test_recipe_config_passes_main_ppo_checks():
    """What ``main_ppo.main`` does before it starts Ray: set the device, then ``validate_config``."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    config = compose_recipe(recipe_overrides()[1])
    auto_set_device(config)
    assert need_reference_policy(config) and not need_critic(config)  # KL loss to the reference; no critic
    validate_config(config=config, use_reference_policy=True, use_critic=False)  # raises on a bad config


def test_verl_extra_installs_what_the_launch_imports():
    import transfer_queue  # noqa: F401  (TaskRunnerV1.run, verl's default trainer)
    from verl.trainer.main_ppo import TaskRunnerV1  # noqa: F401
    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.utils.reward_score import geo3k  # noqa: F401  (the recipe's data; imports mathruler)

    config = compose_recipe(recipe_overrides()[1])
    assert config.trainer.use_v1
    assert get_trainer_cls(config.trainer.v1.trainer_mode).__name__.startswith("PPOTrainer")
    # verl's image dataset imports qwen_vl_utils, which imports torchvision: installed here, importable on GPU
    # nodes where the torchvision matching the CUDA torch is installed (PyPI's do not import with the CPU torch).
    assert importlib.metadata.version("qwen-vl-utils")


def test_the_recipe_s_reward_counts_accurate_answers_as_correct():
    """R1 of the verl review: with verl's geo3k score (0.9 accuracy + 0.1 format) an accurate answer without the
    format scored 0.9 and counted as wrong (correct = reward >= 1). The recipe's reward is the paper's,
    accuracy 1 + format 0.5, loaded as verl loads a custom reward: correct is accurate."""
    from verl.utils.import_utils import load_extern_object

    from apo_kernels import group_advantages

    config = compose_recipe(recipe_overrides()[1])
    reward_fn = config.reward.custom_reward_function
    assert Path(reward_fn.path).exists()
    compute_score = load_extern_object(module_path=reward_fn.path, object_name=reward_fn.name)
    answers = {
        "<think>2 + 2</think> so \\boxed{4}": 1.5,  # accurate, formatted
        "the answer is \\boxed{4}": 1.0,  # accurate, no <think>: correct all the same
        "<think>2 + 3</think> so \\boxed{5}": 0.5,  # formatted, wrong
        "five": 0.0,
    }
    scores = [compute_score("hiyouga/geometry3k", answer, "4") for answer in answers]
    assert scores == list(answers.values())
    out = group_advantages(torch.tensor(scores), group_size=4, config=APOConfig(stcr=False))
    assert out.difficulty.tolist() == [0.5] * 4  # two of four correct: the two accurate answers
