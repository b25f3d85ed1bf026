"""The 'apo' fused forward, run through verl's FSDP engine input/output code, matches verl's unfused path."""

import pytest

pytest.importorskip("verl")

import functools
from types import SimpleNamespace

import torch
import verl.utils.torch_functional as verl_F
from tensordict import TensorDict
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
from transformers.models.qwen2_vl import modeling_qwen2_vl
from verl.models.transformers import dense_common, monkey_patch, qwen2_vl
from verl.models.transformers.monkey_patch import apply_monkey_patch
from verl.utils import tensordict_utils as tu
from verl.utils.metric import Metric
from verl.workers import engine_workers
from verl.workers.config import ActorConfig, PolicyLossConfig
from verl.workers.engine.fsdp import transformer_impl
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

import apo_kernels.integrations.verl as apo_verl
from tests.tiny_models import TINY_TEXT_DIMS
from apo_kernels.integrations.verl import fused_forward

TEMPERATURE = 0.7


class TinyQwen2(Qwen2ForCausalLM):
    """verl patches ``model.__class__.forward``: a subclass keeps that patch away from other tests."""


class TinyQwen2_5_VL(Qwen2_5_VLForConditionalGeneration):
    """As TinyQwen2."""


@pytest.fixture(autouse=True)
def restore_hf_forwards(monkeypatch):
    """verl's apply_monkey_patch also rewrites the HF Qwen2-VL classes' forwards: undo it after each test."""
    for module, names in [
        (modeling_qwen2_5_vl, ["Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel"]),
        (modeling_qwen2_vl, ["Qwen2VLForConditionalGeneration", "Qwen2VLModel"]),
    ]:
        for name in names:
            cls = getattr(module, name)
            monkeypatch.setattr(cls, "forward", cls.forward)
    # verl 0.9.1's apply_monkey_patch imports trl's AutoModelForCausalLMWithValueHead whenever trl is
    # installed, which TRL >= 1.0 no longer has (unrelated to the forward switch under test)
    monkeypatch.setattr(monkey_patch, "is_trl_available", lambda: False)


class PositiveNorm(torch.nn.Module):
    """Final norm replaced so hidden states are >= 1: with a negative LM head every logit is negative."""

    def forward(self, hidden_states):
        return hidden_states.abs() + 1.0


def tiny_model(kind, vocab, all_negative):
    torch.manual_seed(0)
    text = dict(vocab_size=vocab, **TINY_TEXT_DIMS, max_position_embeddings=256)
    if kind == "qwen2_5_vl":
        config = Qwen2_5_VLConfig(
            text_config={**text, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32),
            image_token_id=vocab - 3,
            video_token_id=vocab - 2,
            vision_start_token_id=vocab - 4,
        )
        model = TinyQwen2_5_VL(config)
        language_model = model.model.language_model
    else:
        model = TinyQwen2(Qwen2Config(**text))
        language_model = model.model
    model.config.use_cache = False
    if all_negative:
        language_model.norm = PositiveNorm()
        with torch.no_grad():  # logits between about -200 and -30: exp() underflows without max-subtraction
            model.lm_head.weight.copy_(-(0.5 + torch.rand_like(model.lm_head.weight)) * 1.5)
    return model.float().eval()


def engine_micro_batch(
    kind,
    vocab,
    use_fused_kernels,
    prompt_lens=(5, 2, 3),
    response_lens=(6, 4, 1),
    calculate_entropy=True,
    response_fields=None,
):
    """A micro-batch as verl's trainer and engine build it (left/right padding -> nested, no padding), with
    ``response_fields``, ``(B, R)`` tensors such as the loss's inputs, laid out as verl lays out its own."""
    gen = torch.Generator().manual_seed(1)
    batch, prompt_len, response_len = len(prompt_lens), max(prompt_lens), max(response_lens)
    prompt_mask = torch.arange(prompt_len).flip(0) < torch.tensor(prompt_lens)[:, None]
    response_mask = torch.arange(response_len) < torch.tensor(response_lens)[:, None]
    attention_mask = torch.cat([prompt_mask, response_mask], 1).long()
    input_ids = torch.randint(0, vocab - 4, attention_mask.shape, generator=gen) * attention_mask
    position = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if kind == "qwen2_5_vl":  # verl's layout for Qwen2-VL: (text, t, h, w) positions; text-only -> all equal
        position = position[:, None, :].expand(batch, 4, -1).contiguous()
    fields = {
        "prompts": input_ids[:, :prompt_len],
        "responses": input_ids[:, prompt_len:],
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position,
        "response_mask": response_mask.long(),
        **(response_fields or {}),
    }
    data = left_right_2_no_padding(TensorDict(fields, batch_size=[batch]))
    tu.assign_non_tensor(
        data,
        use_remove_padding=True,
        use_fused_kernels=use_fused_kernels,
        calculate_entropy=calculate_entropy,
        temperature=TEMPERATURE,
    )
    return data


def fsdp_engine(model, use_fused_kernels):
    """The FSDP engine's per-micro-batch methods on a plain module (no process group: one rank, no SP)."""
    engine = object.__new__(FSDPEngineWithLMHead)
    engine.module = model
    engine.pad_to_length = False
    engine.use_ulysses_sp = False
    engine.model_config = SimpleNamespace(
        use_fused_kernels=use_fused_kernels, fused_kernel_options={"impl_backend": "apo"}
    )
    engine.engine_config = SimpleNamespace(entropy_checkpointing=False, entropy_from_logits_with_chunking=False)
    engine.compute_entropy_from_logits = verl_F.entropy_from_logits
    return engine


def forward(model, forward_fn, micro_batch, use_fused_kernels):
    engine = fsdp_engine(model, use_fused_kernels)
    model_inputs, output_args = engine.prepare_model_inputs(micro_batch)
    raw = forward_fn(model, **model_inputs, use_cache=False)
    out = engine.prepare_model_outputs(raw, output_args, micro_batch, logits_processor_func=None)
    # the response part, as the actor loss sees it
    return (
        no_padding_2_padding(out["log_probs"], micro_batch),
        no_padding_2_padding(out["entropy"], micro_batch),
        model_inputs,
    )


@pytest.mark.parametrize("all_negative", [False, True], ids=["random", "all-negative-logits"])
@pytest.mark.parametrize("vocab", [1283, 1000], ids=["V1283", "V1000"])
@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen2"])
def test_fused_forward_matches_verl_unfused(kind, vocab, all_negative):
    model = tiny_model(kind, vocab, all_negative)
    # verl's unfused path: its Qwen2-VL logits forward, HF's forward for plain causal LMs
    unfused_forward = qwen2_vl.forward_with_normal_backend if kind == "qwen2_5_vl" else Qwen2ForCausalLM.forward
    hf_vl_model_forward = modeling_qwen2_5_vl.Qwen2_5_VLModel.forward
    apply_monkey_patch(model, use_remove_padding=False, use_fused_kernels=True, fused_kernels_backend="apo")
    # apply_monkey_patch replaces the base forward of the class, for every later test too: both paths share HF's
    # here (verl's, with its image-less branch, is tested in test_an_image_less_qwen2_5_vl_micro_batch_...).
    modeling_qwen2_5_vl.Qwen2_5_VLModel.forward = hf_vl_model_forward
    expected_forward = apo_verl.qwen2_vl_causal_lm_forward if kind == "qwen2_5_vl" else apo_verl.causal_lm_forward
    assert type(model).forward is expected_forward

    mask = engine_micro_batch(kind, vocab, False)["response_mask"].bool()
    lp_ref, ent_ref, _ = forward(model, unfused_forward, engine_micro_batch(kind, vocab, False), False)
    grad_ref = torch.autograd.grad((lp_ref - 0.1 * ent_ref)[mask].sum(), model.lm_head.weight)[0]
    lp, ent, model_inputs = forward(model, type(model).forward, engine_micro_batch(kind, vocab, True), True)
    grad = torch.autograd.grad((lp - 0.1 * ent)[mask].sum(), model.lm_head.weight)[0]

    # only the response tokens were scored: 6 + 4 + 1 of the 11 + 6 + 4 packed positions
    assert model_inputs["response_label_mask"].sum() == mask.sum() == 11
    if all_negative:
        with torch.no_grad():
            hidden = model.lm_head.weight.new_ones(1, 32)
            assert bool((model.lm_head(hidden) < -30).all())
    torch.testing.assert_close(lp[mask], lp_ref[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent[mask], ent_ref[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6)


def test_other_backends_stay_verl_s():
    """impl_backend=torch still installs verl's own fused forward."""
    model = tiny_model("qwen2", 1283, False)
    apply_monkey_patch(model, use_remove_padding=False, use_fused_kernels=True, fused_kernels_backend="torch")
    assert type(model).forward is dense_common.forward_with_torch_backend


@pytest.mark.parametrize("with_mask", [False, True])
def test_biased_head_matches_logits_divided_by_temperature(with_mask):
    """verl computes (h W^T + b) / tau; the fused path must give the same log-probs and entropy."""
    from apo_kernels.integrations.verl.fused_forward import lm_head_logprobs

    torch.manual_seed(0)
    lm_head = torch.nn.Linear(16, 1031, bias=True).double()
    with torch.no_grad():
        lm_head.bias.mul_(20.0)  # a bias that matters
    hidden = torch.randn(2, 7, 16, dtype=torch.float64)
    labels = torch.randint(0, 1031, (2, 7))
    mask = torch.rand(2, 7) > 0.4 if with_mask else None
    model = torch.nn.Module()
    model.lm_head = lm_head
    logps, entropy = lm_head_logprobs(model, hidden, labels, 0.7, mask, return_entropy=True)
    log_probs = torch.log_softmax(lm_head(hidden) / 0.7, -1)
    want_logps = log_probs.gather(-1, labels[..., None]).squeeze(-1)
    want_entropy = -(log_probs.exp() * log_probs).sum(-1)
    keep = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask
    torch.testing.assert_close(logps[keep], want_logps[keep])
    torch.testing.assert_close(entropy[keep], want_entropy[keep])


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen2"])
def test_entropy_only_when_verl_reads_it(kind):
    """R4 of the verl review: verl reads the entropy only with calculate_entropy (not on the recipe's update steps,
    entropy_coeff=0); the fused forward then skips it and the log-probs stay the same."""
    model = tiny_model(kind, 1000, False)
    hf_vl_model_forward = modeling_qwen2_5_vl.Qwen2_5_VLModel.forward
    apply_monkey_patch(model, use_remove_padding=False, use_fused_kernels=True, fused_kernels_backend="apo")
    modeling_qwen2_5_vl.Qwen2_5_VLModel.forward = hf_vl_model_forward  # as above
    engine = fsdp_engine(model, True)
    results = {}
    for calculate_entropy in (True, False):
        micro_batch = engine_micro_batch(kind, 1000, True, calculate_entropy=calculate_entropy)
        model_inputs, output_args = engine.prepare_model_inputs(micro_batch)
        assert model_inputs["return_entropy"] is calculate_entropy
        raw = type(model).forward(model, **model_inputs, use_cache=False)
        assert (raw.entropy is None) is not calculate_entropy
        out = engine.prepare_model_outputs(raw, output_args, micro_batch, logits_processor_func=None)
        results[calculate_entropy] = no_padding_2_padding(out["log_probs"], micro_batch)
    torch.testing.assert_close(results[False], results[True], rtol=0, atol=0)


def test_an_image_less_qwen2_5_vl_micro_batch_runs_through_verls_base_forward():
    """F2 of the verl review: verl's replacement Qwen2.5-VL base forward runs the vision tower on a dummy grid for a
    micro-batch without images (verl's padding samples make them) and called .mean() on its output object under
    transformers 5. With the adapter installed it runs: the same log-probs as HF's base forward, and the tower's
    parameters take part in the backward (zero gradients), as every FSDP rank's collectives need."""
    model = tiny_model("qwen2_5_vl", 1000, False)
    hf_vl_model_forward = modeling_qwen2_5_vl.Qwen2_5_VLModel.forward
    apply_monkey_patch(model, use_remove_padding=False, use_fused_kernels=True, fused_kernels_backend="apo")
    try:
        assert modeling_qwen2_5_vl.Qwen2_5_VLModel.forward is not hf_vl_model_forward  # verl's base forward
        mask = engine_micro_batch("qwen2_5_vl", 1000, True)["response_mask"].bool()
        lp, _, _ = forward(model, type(model).forward, engine_micro_batch("qwen2_5_vl", 1000, True), True)
        lp[mask].sum().backward()
        assert all(p.grad is not None and not p.grad.any() for p in model.model.visual.parameters())
        modeling_qwen2_5_vl.Qwen2_5_VLModel.forward = hf_vl_model_forward
        lp_hf, _, _ = forward(model, type(model).forward, engine_micro_batch("qwen2_5_vl", 1000, True), True)
        torch.testing.assert_close(lp[mask].detach(), lp_hf[mask].detach(), rtol=1e-6, atol=1e-6)
    finally:
        modeling_qwen2_5_vl.Qwen2_5_VLModel.forward = hf_vl_model_forward


def update_engine(model, sweep, monkeypatch):
    """``fsdp_engine`` able to run verl's own ``forward_step`` on CPU in float64 (no autocast, one rank)."""
    monkeypatch.setattr(transformer_impl, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(transformer_impl, "get_device_name", lambda: "cpu")
    engine = fsdp_engine(model, True)
    engine.model_config.fused_kernel_options["sweep"] = sweep
    engine._autocast_dtype = torch.float32  # verl's forward_step skips autocast for it
    engine.get_data_parallel_group = lambda: None
    return engine


def apo_actor_config(loss_mode, agg_mode, entropy_coeff):
    return ActorConfig(
        strategy="fsdp2",
        rollout_n=2,
        ppo_micro_batch_size_per_gpu=3,
        use_kl_loss=True,
        kl_loss_coef=0.05,
        kl_loss_type="low_var_kl",
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=3.0,
        loss_agg_mode=agg_mode,
        entropy_coeff=entropy_coeff,
        policy_loss=PolicyLossConfig(loss_mode=loss_mode),
    )


def update_micro_batch(engine, kind, vocab, calculate_entropy, response_lens=(6, 4, 1), dads=True):
    """An update micro-batch as verl's actor hands it to the engine: the old log-probs from the engine's own
    forward-only pass (perturbed, so ratios cross both clip edges), reference log-probs, advantages and DADS
    weights (one per response, in (0, 1]) on the response tokens, and verl's normalizers."""
    probe = engine_micro_batch(kind, vocab, True, response_lens=response_lens, calculate_entropy=False)
    with torch.no_grad():
        _, out = engine.forward_step(probe, loss_function=None, forward_only=True)
    current = no_padding_2_padding(out["model_output"]["log_probs"], probe)
    gen = torch.Generator().manual_seed(2)
    mask = torch.arange(current.shape[1]) < torch.tensor(response_lens)[:, None]
    noise = lambda scale: scale * (torch.rand(current.shape, generator=gen, dtype=current.dtype) - 0.5)
    per_response = lambda values: values[:, None].expand_as(current) * mask
    fields = {
        "old_log_probs": (current + noise(0.8)) * mask,
        "ref_log_prob": (current + noise(0.6)) * mask,
        "advantages": per_response(torch.randn(len(response_lens), generator=gen, dtype=current.dtype)),
        "returns": per_response(torch.tensor([0.5, 1.0, 0.8], dtype=current.dtype) if dads else torch.ones(3)),
    }
    data = engine_micro_batch(
        kind, vocab, True, response_lens=response_lens, calculate_entropy=calculate_entropy, response_fields=fields
    )
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    return data


def update_step(engine, model, micro_batch, actor_config):
    """One micro-batch of verl's update: forward_step, then the backward verl runs; loss, metrics, gradients."""
    model.zero_grad(set_to_none=True)
    loss_function = functools.partial(engine_workers.ppo_loss, config=actor_config)
    loss, out = engine.forward_step(micro_batch, loss_function=loss_function, forward_only=False)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), out["metrics"], grads


@pytest.mark.parametrize(
    "kind, loss_mode, agg_mode, entropy_coeff",
    [
        ("qwen2", "apo", "seq-mean-token-mean", 0.0),
        ("qwen2", "apo_gspo", "token-mean", 0.01),
        ("qwen2_5_vl", "apo", "token-mean", 0.01),
        ("qwen2", "apo_geo_mean", "seq-mean-token-sum", 0.01),
    ],
)
def test_update_in_one_pass_equals_two_passes(kind, loss_mode, agg_mode, entropy_coeff, monkeypatch):
    """Issue 24's one pass: on an APO update step the fused forward computes the loss and its gradients in its own
    sweep; float64, every parameter's gradient, the loss and the metrics equal those of verl's order (log-probs in the
    forward, the loss after it, the backward sweeping again)."""
    model = tiny_model(kind, 1283, False).double()
    hf_vl_model_forward = modeling_qwen2_5_vl.Qwen2_5_VLModel.forward
    apply_monkey_patch(model, use_remove_padding=False, use_fused_kernels=True, fused_kernels_backend="apo")
    modeling_qwen2_5_vl.Qwen2_5_VLModel.forward = hf_vl_model_forward  # as in test_fused_forward_matches_...
    actor_config = apo_actor_config(loss_mode, agg_mode, entropy_coeff)
    results = {}
    for sweep in ("two-pass", "auto"):
        engine = update_engine(model, sweep, monkeypatch)
        micro_batch = update_micro_batch(engine, kind, 1283, calculate_entropy=entropy_coeff > 0)
        results[sweep] = update_step(engine, model, micro_batch, actor_config)
    (loss_2, metrics_2, grads_2), (loss_1, metrics_1, grads_1) = results["two-pass"], results["auto"]
    value = lambda metric: metric.aggregate() if isinstance(metric, Metric) else metric
    assert (value(metrics_1["actor/apo/one_pass"]), value(metrics_2["actor/apo/one_pass"])) == (1.0, 0.0)
    torch.testing.assert_close(loss_1, loss_2, rtol=1e-12, atol=1e-14)
    assert grads_1.keys() == grads_2.keys() and "lm_head.weight" in grads_1
    for name in grads_2:
        torch.testing.assert_close(grads_1[name], grads_2[name], rtol=1e-10, atol=1e-13, msg=name)
    assert loss_2 != 0 and grads_2["lm_head.weight"].abs().max() > 1e-6  # a loss with something to compare
    # the same keys (verl's data-parallel aggregation needs them on every rank): the entropy when verl asked for it
    assert metrics_1.keys() == metrics_2.keys() and ("actor/apo/entropy" in metrics_2) is (entropy_coeff > 0)
    for name in metrics_2.keys() - {"actor/apo/one_pass"}:
        assert value(metrics_1[name]) == pytest.approx(value(metrics_2[name]), rel=1e-10, abs=1e-14), name


def test_log_prob_calls_and_two_pass_option_keep_the_forward_log_probs(monkeypatch):
    """Forward-only calls (old and reference log-probs) and ``fused_kernel_options.sweep=two-pass`` leave the loss to
    the loss function: the forward gets no ForwardLoss and scores the response rows only."""
    model = tiny_model("qwen2", 1000, False).double()
    apply_monkey_patch(model, use_remove_padding=False, use_fused_kernels=True, fused_kernels_backend="apo")
    actor_config = apo_actor_config("apo", "token-mean", 0.0)
    loss_function = functools.partial(engine_workers.ppo_loss, config=actor_config)
    engine = update_engine(model, "auto", monkeypatch)
    micro_batch = update_micro_batch(engine, "qwen2", 1000, calculate_entropy=False)
    assert fused_forward.update_sweep(engine, micro_batch, loss_function, forward_only=True) is None
    assert fused_forward.update_sweep(engine, micro_batch, loss_function, forward_only=False) == "auto"
    engine.model_config.fused_kernel_options["sweep"] = "two-pass"
    assert fused_forward.update_sweep(engine, micro_batch, loss_function, forward_only=False) is None
    engine.model_config.fused_kernel_options["sweep"] = "one pass"
    with pytest.raises(ValueError, match="fused_kernel_options.sweep must be one of"):
        fused_forward.update_sweep(engine, micro_batch, loss_function, forward_only=False)
    engine.model_config.fused_kernel_options["sweep"] = "auto"
    engine.use_ulysses_sp = True  # each rank holds a slice of the rows: two passes
    assert fused_forward.update_sweep(engine, micro_batch, loss_function, forward_only=False) is None
    vanilla = functools.partial(engine_workers.ppo_loss, config=apo_actor_config("vanilla", "token-mean", 0.0))
    engine.use_ulysses_sp = False
    assert fused_forward.update_sweep(engine, micro_batch, vanilla, forward_only=False) is None
    for loss_mode in ("apo_clip_cov", "apo_kl_cov"):  # their selections read the whole micro-batch's log-probs
        covariance = functools.partial(engine_workers.ppo_loss, config=apo_actor_config(loss_mode, "token-mean", 0.0))
        assert fused_forward.update_sweep(engine, micro_batch, covariance, forward_only=False) is None


def test_an_all_padding_update_micro_batch_gives_zero_in_one_pass(monkeypatch):
    """verl's padding samples (response mask 0) can fill a whole micro-batch: a zero loss, finite zero gradients."""
    model = tiny_model("qwen2", 1000, False).double()
    apply_monkey_patch(model, use_remove_padding=False, use_fused_kernels=True, fused_kernels_backend="apo")
    engine = update_engine(model, "auto", monkeypatch)
    micro_batch = update_micro_batch(engine, "qwen2", 1000, calculate_entropy=False)
    micro_batch["response_mask"] = micro_batch["response_mask"] * 0
    loss, metrics, grads = update_step(engine, model, micro_batch, apo_actor_config("apo", "token-mean", 0.0))
    assert loss == 0 and metrics["actor/apo/one_pass"].aggregate() == 1.0
    assert all(bool((g == 0).all()) for g in grads.values())
