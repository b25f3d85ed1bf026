"""Convergence parity: APOTrainer with the fused loss learns exactly as with the loss computed from
materialized logits (``apo_kernels.reference``), step by step over 20 optimizer steps, and, with DADS and
STCR off, as TRL's own GRPOTrainer.

Same seeds, same completions (a deterministic ``rollout_func``), so only the loss path differs. SGD, so
that float32 rounding differences stay the size they are (Adam divides them by tiny second moments).
"""

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import apo_kernels.integrations.trl.lm_head as apo_head  # noqa: E402
from apo_kernels import reference  # noqa: E402
from apo_kernels.integrations.trl import APOGRPOConfig, APOTrainer  # noqa: E402
from examples import trl_apo_qwen2_5_vl as example  # noqa: E402
from tests.integrations.trl.rollouts import deterministic_rollout  # noqa: E402
from tests.integrations.trl.test_apo_trainer import GROUP, image_dataset, length_reward  # noqa: E402
from tests.strategies import relative_error  # noqa: E402

STEPS = 20
ARGS = dict(
    report_to="none",
    use_cpu=True,
    bf16=False,
    seed=0,
    save_strategy="no",
    num_generations=GROUP,
    max_completion_length=8,
    per_device_train_batch_size=2 * GROUP,
    gradient_accumulation_steps=1,
    max_steps=STEPS,
    logging_steps=1,
    optim="sgd",
    learning_rate=0.5,
    lr_scheduler_type="constant",
    max_grad_norm=0.0,
    beta=0.05,
    epsilon=0.2,
    epsilon_high=0.28,
    use_bias_correction_kl=False,
)
# float32: the fused and the materialized loss sum in different orders (~1e-7 per step); 20 steps of SGD
# carry those differences into the parameters without amplifying them much.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-vl")
    example.build_tiny_model(example.build_tiny_processor(), seed=0).save_pretrained(path)
    return str(path)


def reference_apo_loss(hidden, weight, targets, mask, advantages, *, backend, vocab_parallel_group, **kwargs):
    """The APO head's loss call, answered by the materialized-logits oracle."""
    return reference.apo_loss(hidden, weight, targets, mask, advantages, **kwargs)


def train(model_dir, tmp_path, monkeypatch, *, trainer_cls=APOTrainer, loss=apo_head.apo_loss, **overrides):
    """``STEPS`` optimizer steps; the loss of each step, the log-probs each loss call saw, the final parameters."""
    seen_logps = []

    def recording(*args, **kwargs):
        out = loss(*args, **kwargs)
        seen_logps.append(out.logps.clone())
        return out

    monkeypatch.setattr(apo_head, "apo_loss", recording)
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    config_cls = APOGRPOConfig if trainer_cls is APOTrainer else GRPOConfig
    args = config_cls(output_dir=str(tmp_path / trainer_cls.__name__), **{**ARGS, **overrides})
    trainer = trainer_cls(
        model=model_dir,
        reward_funcs=[length_reward],
        args=args,
        train_dataset=image_dataset(),
        processing_class=example.build_tiny_processor(),
        rollout_func=deterministic_rollout,
    )
    trainer.train()
    losses = torch.tensor([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return losses, seen_logps, params


def assert_same_training(got, want):
    losses, logps, params = got
    want_losses, want_logps, want_params = want
    assert len(losses) == len(want_losses) == STEPS
    assert relative_error(losses, want_losses) < TOLERANCE
    if want_logps:  # GRPOTrainer does not go through the APO head
        assert len(logps) == len(want_logps) == STEPS
        assert relative_error(torch.cat(logps), torch.cat(want_logps)) < TOLERANCE
    errors = {name: relative_error(params[name], p) for name, p in want_params.items()}
    assert max(errors.values()) < TOLERANCE, {k: f"{v:.2e}" for k, v in errors.items() if v >= TOLERANCE}


@pytest.mark.parametrize("apo_parts", ["dads-stcr", "grpo-special-case"])
def test_fused_loss_trains_like_the_materialized_loss(apo_parts, model_dir, tmp_path, monkeypatch):
    overrides = {} if apo_parts == "dads-stcr" else dict(dads=False, stcr=False, adv_eps=1e-4)
    fused = train(model_dir, tmp_path, monkeypatch, **overrides)
    materialized = train(model_dir, tmp_path, monkeypatch, loss=reference_apo_loss, **overrides)
    assert_same_training(fused, materialized)
    initial = dict(Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir).named_parameters())
    moved = {name: relative_error(fused[2][name], p) for name, p in initial.items()}
    assert max(moved.values()) > 1e-2, "training should move the parameters"
    assert fused[0][-1] != fused[0][0]


def test_grpo_special_case_trains_like_trl_grpo_trainer(model_dir, tmp_path, monkeypatch):
    """DADS and STCR off: APOTrainer's 20 steps are GRPOTrainer's (same config, same completions)."""
    apo = train(model_dir, tmp_path, monkeypatch, dads=False, stcr=False, adv_eps=1e-4)
    grpo = train(model_dir, tmp_path, monkeypatch, trainer_cls=GRPOTrainer)
    assert_same_training(apo, grpo[:1] + ([],) + grpo[2:])
