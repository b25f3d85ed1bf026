"""APOTrainer against TRL's GRPOTrainer, on tiny random models made locally (CPU, nothing downloaded)."""

import math
import re

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from apo_kernels import APOConfig, group_advantages  # noqa: E402
from apo_kernels.integrations.trl import APOGRPOConfig, APOTrainer, add_apo_head  # noqa: E402
from apo_kernels.inputs import BACKENDS  # noqa: E402
from examples import trl_apo_qwen2_5_vl as example  # noqa: E402
from tests.integrations import composes  # noqa: E402
from tests.tiny_models import tiny_qwen2_config  # noqa: E402

GROUP = 4
CPU = dict(output_dir="/tmp/unused", use_cpu=True, bf16=False, report_to="none")
COMMON_ARGS = dict(
    report_to="none",
    use_cpu=True,
    bf16=False,
    seed=0,
    num_generations=GROUP,
    max_completion_length=8,
    logging_steps=1,
    save_strategy="no",
    use_bias_correction_kl=False,
)


def length_reward(completion_ids, **kwargs):
    """A reward that varies within groups: completion length mod 3."""
    return [float(len(ids) % 3) for ids in completion_ids]


@pytest.fixture(scope="module")
def processor():
    return example.build_tiny_processor()


@pytest.fixture(scope="module")
def vl_model_path(processor, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny-vl"))
    example.build_tiny_model(processor, seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_model_path(processor, tmp_path_factory):
    tokenizer = processor.tokenizer
    config = tiny_qwen2_config(
        len(tokenizer),
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("tiny-text"))
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def image_dataset():
    """Two prompts with different text (so groups are told apart by their prompt ids) and images."""
    texts = ["what colour is the picture ?", "what is the colour of the picture ?"]
    colours = [(220, 30, 30), (30, 60, 220)]
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": t}] for t in texts],
            "image": [Image.new("RGB", (example.TINY_IMAGE_SIZE,) * 2, c) for c in colours],
            "solution": ["red", "blue"],
        }
    )


def text_dataset():
    texts = ["what colour is it ?", "what is the colour of it ?"]
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in texts], "solution": ["red", "blue"]})


def generation_rows(dataset):
    """A generation batch as TRL's RepeatSampler yields it: each prompt repeated GROUP times, contiguously."""
    return [dict(dataset[i]) for i in range(len(dataset)) for _ in range(GROUP)]


def make_trainers(model_path, processor, dataset, loss_type, **options):
    """An APOTrainer with DADS and STCR off and a GRPOTrainer with matching settings, on the same weights."""
    shared = dict(
        COMMON_ARGS,
        **options,
        loss_type=loss_type,
        beta=0.05,
        epsilon=0.2,
        epsilon_high=1.3 if loss_type == "cispo" else 0.28,  # CISPO's is the ratio's upper bound itself
        per_device_train_batch_size=GROUP,
        gradient_accumulation_steps=2,
    )
    apo_args = APOGRPOConfig(output_dir="/tmp/unused-apo", dads=False, stcr=False, adv_eps=1e-4, **shared)
    grpo_args = GRPOConfig(output_dir="/tmp/unused-grpo", **shared)
    trainers = []
    for cls, args in ((APOTrainer, apo_args), (GRPOTrainer, grpo_args)):
        trainer = cls(
            model=model_path, reward_funcs=[length_reward], args=args, train_dataset=dataset, processing_class=processor
        )
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 2  # set by the training loop; the loss divides by it
        trainers.append(trainer)
    return trainers


def perturbed(batch, generator, sequence_shift=False):
    """The batch with off-policy old log-probs (so the ratio clips; ``sequence_shift`` also shifts every other
    sequence's, so that those sequence ratios clip), a distinct reference and varied advantages."""
    mask = batch["completion_mask"].bool()
    like = batch["completion_mask"].float()
    current = batch["ref_per_token_logps"]
    out = dict(batch)
    out["old_per_token_logps"] = current + 0.3 * torch.randn(like.shape, generator=generator)
    out["ref_per_token_logps"] = torch.where(
        mask, current + 0.2 * torch.randn(like.shape, generator=generator), current
    )
    out["advantages"] = torch.randn(like.shape[0], generator=generator)
    if sequence_shift:  # ratios near e^0.5 (A > 0) or e^-0.5 (A < 0) in sequences 0, 2, ...
        shift = 0.5 * out["advantages"].sign() * (torch.arange(like.shape[0]) % 2 == 0)
        out["old_per_token_logps"] = out["old_per_token_logps"] - shift.unsqueeze(1)
    return out


def loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


SEQUENCE = {"importance_sampling_level": "sequence"}  # GSPO's sequence ratios


def trainers_and_batch(model_kind, loss_type, options, processor, vl_model_path, text_model_path, perturb=True):
    """Matching trainers and a perturbed batch (unperturbed with ``perturb=False``: its reference log-probs are the
    policy's) both generated the same, after checking their group stages agree."""
    if model_kind == "vl":
        model_path, processing_class, dataset = vl_model_path, processor, image_dataset()
    else:
        model_path, processing_class, dataset = text_model_path, processor.tokenizer, text_dataset()
    apo, grpo = make_trainers(model_path, processing_class, dataset, loss_type, **options)
    rows = generation_rows(dataset)

    torch.manual_seed(1)
    apo_batch = apo._generate_and_score_completions(rows)
    torch.manual_seed(1)
    grpo_batch = grpo._generate_and_score_completions(rows)
    assert torch.equal(apo_batch["completion_ids"], grpo_batch["completion_ids"])
    assert grpo_batch["advantages"].abs().max() > 0, "the reward should vary within a group"
    # Group stage: with DADS and STCR off, APO's advantages are GRPO's.
    torch.testing.assert_close(apo_batch["advantages"], grpo_batch["advantages"], rtol=1e-5, atol=1e-6)
    assert torch.equal(apo_batch["kl_weights"], torch.ones_like(apo_batch["kl_weights"]))
    if not perturb:
        return apo, grpo, apo_batch
    sequence_level = options.get("importance_sampling_level") == "sequence"
    return apo, grpo, perturbed(apo_batch, torch.Generator().manual_seed(2), sequence_shift=sequence_level)


def assert_same_loss_and_grads(apo, grpo, batch):
    apo_loss, apo_grads = loss_and_grads(apo, batch)
    grpo_loss, grpo_grads = loss_and_grads(grpo, {k: v for k, v in batch.items() if k != "kl_weights"})
    torch.testing.assert_close(apo_loss, grpo_loss, rtol=1e-5, atol=1e-7)
    assert apo_grads.keys() == grpo_grads.keys()
    for name, grad in grpo_grads.items():
        torch.testing.assert_close(apo_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def case_id(value):
    return ("-".join(f"{k}={v}" for k, v in value.items()) or "defaults") if isinstance(value, dict) else None


@pytest.mark.parametrize(
    "model_kind, loss_type, options", [case.params() for case in composes.trl_cases("parity")], ids=case_id
)
def test_parity_with_grpo_trainer(model_kind, loss_type, options, processor, vl_model_path, text_model_path):
    apo, grpo, batch = trainers_and_batch(model_kind, loss_type, options, processor, vl_model_path, text_model_path)
    if options.get("mask_truncated_completions"):
        assert not batch["completion_mask"].any(-1).all(), "some completions should be truncated, hence empty"
    assert_same_loss_and_grads(apo, grpo, batch)
    clip_metrics = {"cispo": ["cispo_clip_ratio"], "sapo": [], "vespo": ["vespo/phi_seq_mean"]}.get(
        loss_type, ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
    )
    bonus_metrics = ["policy_loss", "entropy_coef"] if options.get("entropy_coef") else []
    for metric in ["kl", "entropy", *clip_metrics, *bonus_metrics]:
        assert apo._metrics["train"][metric][-1] == pytest.approx(
            grpo._metrics["train"][metric][-1], rel=1e-4, abs=1e-6
        )
    assert not clip_metrics or apo._metrics["train"][clip_metrics[-1]][-1] > 0, "the perturbed ratios should clip"
    assert not [name for name in apo._metrics["train"] if "clip_ratio" in name and name not in clip_metrics]
    # DADS and STCR are off: none of their (constant) metrics is logged; the group's own stats are.
    logged = apo._metrics["train"].keys()
    assert not [name for name in logged if "dads" in name or "stcr" in name or "kl_weight" in name], list(logged)
    assert {"apo/correct_frac", "apo/difficulty/mean", "apo/advantages/std"} <= logged


@pytest.mark.parametrize(
    "model_kind, loss_type, options", [case.params() for case in composes.trl_cases("off_policy_mask")], ids=case_id
)
def test_off_policy_mask_matches_grpo_trainer(
    model_kind, loss_type, options, processor, vl_model_path, text_model_path
):
    """DeepSeek-V3.2's off-policy sequence mask (off_policy_mask_threshold): the perturbed batch's sampler (the
    old log-probs, without vLLM) drifted past the threshold in some negative-advantage sequences, which both
    trainers drop from the policy term; the same loss and gradients."""
    threshold = -0.05  # negative: this small batch then has dropped and kept negative-advantage sequences
    options = dict(options, off_policy_mask_threshold=threshold)
    apo, grpo, generated = trainers_and_batch(
        model_kind, loss_type, options, processor, vl_model_path, text_model_path, perturb=False
    )
    batch = perturbed(generated, torch.Generator().manual_seed(2))
    mask = batch["completion_mask"].bool()
    current = generated["ref_per_token_logps"]  # the policy's log-probs: the reference is the same weights
    drift = ((batch["old_per_token_logps"] - current) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    dropped = (drift > threshold) & (batch["advantages"] < 0)
    assert dropped.any() and not dropped.all(), (drift, batch["advantages"])
    assert_same_loss_and_grads(apo, grpo, batch)


@pytest.mark.parametrize("loss_type", ["grpo", "cispo", "vespo"])
def test_vllm_importance_weights_with_sequence_ratios_match_grpo_trainer(
    loss_type, processor, vl_model_path, text_model_path
):
    """vLLM's per-token importance weights on a sequence ratio's policy term (GRPOTrainer applies them when it
    generates with vLLM; here it is told to, after generating locally)."""
    options = {} if loss_type == "vespo" else SEQUENCE  # VESPO's sequence ratio is its own
    apo, grpo, batch = trainers_and_batch("text", loss_type, options, processor, vl_model_path, text_model_path)
    grpo.use_vllm, grpo.vllm_importance_sampling_correction = True, True
    gen = torch.Generator().manual_seed(3)
    mask = batch["completion_mask"].bool()  # TRL's weights are exp(0) = 1 on padding
    batch["importance_sampling_ratio"] = torch.where(mask, 0.5 + torch.rand(mask.shape, generator=gen), 1.0)
    assert_same_loss_and_grads(apo, grpo, batch)


ADAPTIVE = dict(use_adaptive_entropy=True, entropy_coef=0.01, entropy_coef_delta=0.02, entropy_coef_max=0.05)


@pytest.mark.parametrize(
    "model_kind, loss_type, options", [case.params() for case in composes.trl_cases("adaptive_entropy")], ids=case_id
)
def test_adaptive_entropy_matches_grpo_trainer(
    model_kind, loss_type, options, processor, vl_model_path, text_model_path
):
    """use_adaptive_entropy: GRPOTrainer's coefficient, off until the first optimizer step measured the entropy below
    entropy_target, then stepped by entropy_coef_delta per optimizer step up to entropy_coef_max (the window's
    entropy over its micro-batches, two per step here); every micro-batch's loss and gradients, the logged
    coefficient and policy loss equal GRPOTrainer's, and the coefficient moves."""
    options = dict(options, **ADAPTIVE, entropy_target=50.0)  # above the tiny models' entropies: it rises
    apo, grpo, batch = trainers_and_batch(model_kind, loss_type, options, processor, vl_model_path, text_model_path)
    generator = torch.Generator().manual_seed(5)
    for step in range(6):
        sync = step % 2 == 1  # the second micro-batch of each accumulation window ends an optimizer step
        micro_batch = perturbed(batch, generator, sequence_shift=loss_type == "cispo")
        for trainer in (apo, grpo):
            trainer.accelerator.gradient_state._set_sync_gradients(sync)
        assert_same_loss_and_grads(apo, grpo, micro_batch)
        assert (apo.entropy_coef, apo._last_world_entropy) == pytest.approx(
            (grpo.entropy_coef, grpo._last_world_entropy)
        )
    for metric in ("entropy_coef", "policy_loss"):
        assert apo._metrics["train"][metric] == pytest.approx(grpo._metrics["train"][metric], rel=1e-5, abs=1e-7)
    assert apo._metrics["train"]["entropy_coef"] == pytest.approx([0.03, 0.05, 0.05])


def test_group_stage_sees_whole_groups_when_micro_batches_split_them(processor, vl_model_path):
    args = APOGRPOConfig(
        output_dir="/tmp/unused-apo",
        per_device_train_batch_size=2,  # half a group per micro-batch
        gradient_accumulation_steps=4,
        **COMMON_ARGS,
    )
    dataset = image_dataset()
    trainer = APOTrainer(
        model=vl_model_path, reward_funcs=[length_reward], args=args, train_dataset=dataset, processing_class=processor
    )
    trainer.model.train()
    torch.manual_seed(3)
    trainer._prepare_inputs(generation_rows(dataset))
    micro_batches = trainer._buffered_inputs
    assert len(micro_batches) == 4 and all(len(mb["advantages"]) == 2 for mb in micro_batches)

    rows = [
        (
            mb["prompt_ids"][i][mb["prompt_mask"][i].bool()],
            mb["completion_mask"][i].sum(),
            mb["advantages"][i],
            mb["kl_weights"][i],
        )
        for mb in micro_batches
        for i in range(2)
    ]
    prompts = [tuple(p.tolist()) for p, *_ in rows]
    group_ids = torch.tensor([sorted(set(prompts)).index(p) for p in prompts])
    assert torch.bincount(group_ids).tolist() == [GROUP, GROUP]
    lengths = torch.stack([length for _, length, _, _ in rows])
    expected = group_advantages(lengths.float() % 3, group_ids=group_ids, lengths=lengths, config=args.to_apo_config())
    torch.testing.assert_close(torch.stack([adv for *_, adv, _ in rows]), expected.advantages)
    torch.testing.assert_close(torch.stack([w for *_, w in rows]), expected.kl_weights)


def test_tiny_example_trains_two_steps(tmp_path):
    trainer = example.main(["--tiny", "--output-dir", str(tmp_path), "--max-steps", "2"])
    steps = [log for log in trainer.state.log_history if "loss" in log]
    assert trainer.state.global_step == 2 and len(steps) == 2
    assert all(math.isfinite(log["loss"]) for log in steps)
    for metric in (
        "kl",
        "entropy",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "apo/dads_weight/mean",
        "apo/dads_weight/std",
        "apo/stcr_weight/mean",
        "apo/stcr_frac",
        "apo/difficulty/mean",
        "apo/correct_frac",
        "apo/advantages/std",
        "apo/kl_weight/token_mean",
    ):
        assert all(metric in log for log in steps), metric
    initial = dict(Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "tiny-qwen2.5-vl").named_parameters())
    trained = dict(trainer.model.named_parameters())
    assert initial.keys() == trained.keys()
    changed = [name for name, value in initial.items() if not torch.equal(value, trained[name])]
    assert "lm_head.weight" in changed or "model.language_model.embed_tokens.weight" in changed, changed


def test_config_rejects_what_apo_loss_cannot_honour():
    with pytest.raises(ValueError, match="APOTrainer supports loss_type in"):
        APOGRPOConfig(**CPU, loss_type="gspo")  # TRL's GSPO is importance_sampling_level="sequence"
    with pytest.raises(ValueError, match="off_policy_mask_threshold must be None or a finite float, got nan"):
        APOGRPOConfig(**CPU, off_policy_mask_threshold=math.nan)
    with pytest.raises(ValueError, match="scale_rewards"):
        APOGRPOConfig(**CPU, scale_rewards="global")
    with pytest.raises(ValueError, match=r"use_bias_correction_kl must be False with loss_type='vespo'"):
        APOGRPOConfig(**CPU, loss_type="vespo")  # GRPOConfig's default: True
    APOGRPOConfig(**CPU, loss_type="vespo", beta=0.0)  # no KL term, nothing to weight
    with pytest.raises(ValueError, match="stcr_base"):
        APOGRPOConfig(**CPU, stcr_base=1.0)
    with pytest.raises(TypeError, match="APOGRPOConfig"):
        APOTrainer(model="unused", reward_funcs=[length_reward], args=GRPOConfig(**CPU))


def test_config_maps_trl_fields_onto_apo_config():
    args = APOGRPOConfig(
        **CPU,
        loss_type="dr_grpo",
        beta=0.02,
        epsilon=0.1,
        epsilon_high=0.3,
        temperature=0.7,
        max_completion_length=64,
        scale_rewards="none",
        kl_agg_mode="seq-mean-token-mean",
        dads_variant="difficulty",
    )
    assert args.to_apo_config() == APOConfig(
        beta=0.02,
        eps_low=0.1,
        eps_high=0.3,
        temperature=0.7,
        loss_agg_mode="seq-mean-token-sum-norm",
        kl_agg_mode="seq-mean-token-mean",
        loss_agg_norm=64,
        scale_rewards=False,
        dads_variant="difficulty",
        kl_bias_correction=True,  # use_bias_correction_kl, GRPOConfig's default
        entropy_token_mean=True,  # GRPOTrainer's entropy bonus
    )


@pytest.mark.parametrize(
    "options, argument, value, apo_names",
    [
        (dict(epsilon=1.5), "epsilon", 1.5, ["eps_low"]),
        (dict(epsilon=math.nan), "epsilon", math.nan, ["eps_low"]),
        (dict(epsilon="wide"), "epsilon", "wide", ["eps_low"]),
        (dict(epsilon_high=-0.5), "epsilon_high", -0.5, ["eps_high"]),
        (dict(delta=0.5), "delta", 0.5, ["ratio_cap"]),
        (dict(loss_type="sapo", delta=2.0), "delta", 2.0, ["ratio_cap", "policy_loss"]),
        (dict(loss_type="sapo", sapo_temperature_pos=0.0), "sapo_temperature_pos", 0.0, ["sapo_tau"]),
        (dict(sapo_temperature_neg=-1.0), "sapo_temperature_neg", -1.0, ["sapo_tau"]),
        (dict(vespo_lambda_neg=0.0), "vespo_lambda_neg", 0.0, []),
        (
            dict(loss_type="vespo", importance_sampling_level="sequence"),
            "importance_sampling_level",
            "sequence",
            ["policy_loss"],
        ),
        (dict(loss_type="dr_grpo", max_completion_length=0), "max_completion_length", 0, ["loss_agg_norm"]),
        (dict(beta=None), "beta", None, []),
        (dict(temperature=0.0), "temperature", 0.0, []),
        (dict(kl_agg_mode="token-sum"), "kl_agg_mode", "token-sum", []),
        (dict(kl_estimator="k4"), "kl_estimator", "k4", []),
    ],
)
def test_config_errors_name_the_trl_argument_and_its_value(options, argument, value, apo_names):
    with pytest.raises(ValueError, match=rf"^{argument} must be .+, got {re.escape(repr(value))}$") as error:
        APOGRPOConfig(**CPU, **options)
    for name in ["APOConfig", *apo_names]:
        assert name not in str(error.value)


@pytest.mark.parametrize(
    "options, argument, value, never_passed",
    [
        (dict(epsilon=0.0), "epsilon", 0.0, "-1.0"),  # epsilon_high=None: TRL's CISPO bound is epsilon
        (dict(epsilon_high=0.0), "epsilon_high", 0.0, "-1.0"),
        (dict(epsilon_high=-2.0), "epsilon_high", -2.0, "-3.0"),
        (dict(epsilon_high=math.inf), "epsilon_high", math.inf, "eps_high"),
    ],
)
def test_config_cispo_bound_errors_show_only_what_the_user_set(options, argument, value, never_passed):
    with pytest.raises(ValueError, match=rf"^{argument} must be a finite float > 0 with loss_type='cispo'") as error:
        APOGRPOConfig(**CPU, loss_type="cispo", **options)
    message = str(error.value)
    assert message.endswith(f"got {value!r}")
    for name in ("eps_high", "eps_low", "policy_loss", "APOConfig", never_passed):
        assert name not in message
    # and the translation still holds for a valid bound: APO's eps_high is the bound minus 1
    assert APOGRPOConfig(**CPU, loss_type="cispo", epsilon_high=5.0).to_apo_config().eps_high == 4.0


@pytest.mark.parametrize("threshold", [math.nan, math.inf, -math.inf, None, "1.0"])
def test_config_rejects_a_non_finite_correctness_threshold(threshold):
    # NaN would count every answer as wrong: DADS and STCR silently off
    with pytest.raises(
        ValueError, match=rf"^correctness_threshold must be a finite float, got {re.escape(repr(threshold))}$"
    ):
        APOGRPOConfig(**CPU, correctness_threshold=threshold)
    assert APOGRPOConfig(**CPU, correctness_threshold=0).correctness_threshold == 0


@pytest.mark.parametrize("backend", ["cuda", "trition", "Triton", None])
def test_config_rejects_an_unknown_apo_backend_at_construction(backend):
    with pytest.raises(ValueError, match=rf"^apo_backend must be one of .*, got {re.escape(repr(backend))}$") as error:
        APOGRPOConfig(**CPU, apo_backend=backend)
    for name in BACKENDS:
        assert repr(name) in str(error.value)
    for name in BACKENDS:
        assert APOGRPOConfig(**CPU, apo_backend=name).apo_backend == name


def test_rejects_models_with_logit_transforms(text_model_path):
    model = Qwen2ForCausalLM.from_pretrained(text_model_path)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        add_apo_head(model)


def test_rejects_peft_adapter_on_lm_head(processor, text_model_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        Qwen2ForCausalLM.from_pretrained(text_model_path), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"])
    )
    with pytest.raises(ValueError, match="lm_head"):
        APOTrainer(
            model=model,
            reward_funcs=[length_reward],
            args=APOGRPOConfig(**CPU, num_generations=GROUP, per_device_train_batch_size=GROUP),
            train_dataset=text_dataset(),
            processing_class=processor.tokenizer,
        )


def test_apo_head_on_a_biased_lm_head_matches_logits_over_temperature():
    """TRL divides the biased logits by the temperature: (h W^T + b) / tau, not h W^T / tau + b."""
    from apo_kernels.integrations.trl import APOLossInputs

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=103,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).double()
    model.lm_head = torch.nn.Linear(16, 103, bias=True).double()
    with torch.no_grad():
        model.lm_head.bias.mul_(20.0)
    add_apo_head(model)
    input_ids = torch.randint(0, 103, (2, 9))
    completion = input_ids[:, -4:]
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, -5:-1] / 0.7
        want = torch.log_softmax(logits, -1).gather(-1, completion[..., None]).squeeze(-1)
        apo_inputs = APOLossInputs(
            targets=completion,
            mask=torch.ones_like(completion),
            advantages=torch.ones(2, dtype=torch.float64),
            kl_weights=None,
            old_logps=None,
            ref_logps=None,
            num_tokens=None,
            num_sequences=None,
            config=APOConfig(temperature=0.7, beta=0.0, dads=False, stcr=False),
        )
        out = model(input_ids=input_ids, apo_inputs=apo_inputs)
    torch.testing.assert_close(out.log_probs, want)


def test_resume_continues_the_run_exactly(tmp_path, monkeypatch):
    """transformers saves Qwen2.5-VL under its original weight names (``model.layers.*``, ``visual.*``), which
    Trainer's own resume loads into nothing (huggingface/transformers#43701); APOTrainer's resume loads them: 2
    steps, then a resume to step 3, end with the weights and logs of an uninterrupted 3-step run. The run steers
    an adaptive entropy coefficient, whose state (GRPOTrainer's) the resume restores too."""
    from apo_kernels.integrations.trl.trainer import _saved_weight_names

    import apo_kernels.integrations.trl as apo_trl

    adaptive = dict(ADAPTIVE, entropy_target=50.0)  # above the tiny model's entropy: the coefficient rises
    monkeypatch.setattr(apo_trl, "APOGRPOConfig", lambda **kwargs: APOGRPOConfig(**{**kwargs, **adaptive}))

    interrupted, whole = tmp_path / "interrupted", tmp_path / "whole"
    first = example.main(["--tiny", "--output-dir", str(interrupted), "--max-steps", "2"])
    saved = _saved_weight_names(str(interrupted / "checkpoint-2"))
    assert saved and not saved <= set(first.model.state_dict()), "the checkpoint no longer uses other names"
    resumed = example.main(["--tiny", "--output-dir", str(interrupted), "--max-steps", "3", "--resume"])
    uninterrupted = example.main(["--tiny", "--output-dir", str(whole), "--max-steps", "3"])

    assert resumed.state.global_step == 3
    logged = lambda run: [
        (log["step"], log["loss"], log["reward"], log["entropy_coef"]) for log in run.state.log_history if "loss" in log
    ]
    assert logged(resumed) == logged(uninterrupted)
    assert [step[-1] for step in logged(uninterrupted)] == pytest.approx([0.03, 0.05, 0.05])
    expected = dict(uninterrupted.model.named_parameters())
    for name, value in resumed.model.named_parameters():
        assert torch.equal(value, expected[name]), name
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(interrupted / "checkpoint-3")
    for name, value in reloaded.named_parameters():
        assert torch.equal(value, expected[name]), name
