"""A fused log-prob backend for verl: ``model.use_fused_kernels=True`` with ``fused_kernel_options.impl_backend=apo``.

With fused kernels on, verl replaces the model's ``forward`` by one that returns per-token ``log_probs``
and ``entropy`` instead of logits (``verl.models.transformers.monkey_patch.patch_forward_with_backends``).
This module adds an ``apo`` backend to that switch, for Qwen2-VL / Qwen2.5-VL and plain causal LMs: the
forward runs verl's own base-model forward and then :func:`apo_kernels.fused_linear_logprobs`, so the
``N x V`` logits never exist.

verl's fused forwards score every packed token, prompt included, though only response tokens reach the
loss; for a VLM the prompt holds the image tokens and is often the larger part. The FSDP engine's
``prepare_model_inputs`` is therefore extended to pass ``response_label_mask``, the packed positions whose
*label* is a response token, laid out (static padding, Ulysses slicing) exactly like verl's ``shift_labels``;
the forward scores those rows only and returns zeros elsewhere, which verl slices away.

On the actor's update steps the micro-batch already holds what the APO loss needs, so the forward computes the loss
itself, its gradients in the same vocabulary sweep (:func:`apo_kernels.apo_loss`, one pass: 6 N D V FLOPs instead of
the log-probs' forward and the backward's second sweep, 8 N D V); ``fused_kernel_options.sweep`` chooses
(:func:`forward_step`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from verl.models.transformers import monkey_patch
from verl.models.transformers import qwen2_vl as verl_qwen2_vl
from verl.models.transformers.dense_common import CausalLMOutputForPPO, forward_base_model
from verl.models.transformers.qwen2_vl import Qwen2VLCausalLMOutputForPPO, qwen2_vl_forward
from verl.utils import tensordict_utils as tu
from verl.utils.transformers_compat import unpack_visual_output
from verl.utils.ulysses import ulysses_pad_and_slice_inputs
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

from apo_kernels import apo_loss, fused_linear_logprobs

from ..lm_head import lm_head_for_loss
from .loss import (
    COVARIANCE_LOSS_MODES,
    FORWARD_LOSS_KEY,
    LOSS_MODES,
    ForwardLoss,
    actor_loss_inputs,
    ppo_loss_with_apo,
)

BACKEND_NAME = "apo"
QWEN2_VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")

verl_patch_forward_with_backends = monkey_patch.patch_forward_with_backends
verl_prepare_model_inputs = FSDPEngineWithLMHead.prepare_model_inputs
verl_get_input_embeds = verl_qwen2_vl._get_input_embeds
verl_forward_step = FSDPEngineWithLMHead.forward_step
verl_prepare_model_outputs = FSDPEngineWithLMHead.prepare_model_outputs
#: ``fused_kernel_options.sweep``: where the actor update's loss is computed. ``auto`` and ``one-pass``: in the
#: forward (``apo_loss``'s ``sweep``: ``auto`` falls back to two passes when its workspace holds too few rows),
#: ``two-pass``: after it, from the log-probs, as verl computes its losses.
SWEEPS = ("auto", "one-pass", "two-pass")


@dataclass
class CausalLMOutputWithAPOLoss(CausalLMOutputForPPO):
    """verl's fused output, plus the update's APO loss when the forward computed it. The loss is a forward output so
    that FSDP2 hooks its backward, which gathers the parameters again before the loss's backward runs (as for the
    log-probs); a loss kept elsewhere would meet resharded, freed, parameters."""

    apo_loss: Optional[torch.FloatTensor] = None


@dataclass
class Qwen2VLCausalLMOutputWithAPOLoss(Qwen2VLCausalLMOutputForPPO):
    """As :class:`CausalLMOutputWithAPOLoss`, for Qwen2-VL / Qwen2.5-VL."""

    apo_loss: Optional[torch.FloatTensor] = None


def next_token_labels(input_ids, labels, shift_labels) -> torch.Tensor:
    """The label of each position: verl's pre-rolled ``shift_labels`` when given (they are rolled over the
    whole packed sequence, before any Ulysses slicing), else ``labels`` or ``input_ids`` rolled by one."""
    if shift_labels is not None:
        return shift_labels
    source = labels if labels is not None else input_ids
    if source is None:
        raise ValueError("the fused forward needs input_ids, labels or shift_labels to know the next tokens")
    return torch.roll(source, shifts=-1, dims=-1)


def lm_head_logprobs(
    model: torch.nn.Module,
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    response_label_mask: Optional[torch.Tensor],
    return_entropy: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Label-shaped float32 ``(log_probs, entropy)`` of ``model.lm_head``, fused; only rows of
    ``response_label_mask`` when given (the others are 0); ``entropy`` is None unless ``return_entropy``."""
    # The bias comes as b / temperature: verl divides the biased logits (see lm_head_for_loss).
    with lm_head_for_loss(model, model.lm_head, temperature=temperature) as (weight, bias, vocab_parallel_group):
        return fused_linear_logprobs(
            hidden_states,
            weight,
            labels,
            bias=bias,
            temperature=temperature,
            return_entropy=return_entropy,
            mask=response_label_mask,
            vocab_parallel_group=vocab_parallel_group,
        )


def lm_head_forward_loss(
    model: torch.nn.Module,
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    forward_loss: ForwardLoss,
    return_entropy: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Run the update micro-batch's APO loss on the response rows of the packed ``(1, P, D)`` hidden states (its
    metrics kept in ``forward_loss.output``); returns the label-shaped detached ``(log_probs, entropy)`` of those rows
    (0 elsewhere) and the loss."""
    inputs = forward_loss.inputs
    rows = forward_loss.rows
    with lm_head_for_loss(model, model.lm_head, temperature=temperature) as (weight, bias, vocab_parallel_group):
        out = apo_loss(
            hidden_states[0][rows],
            weight,
            labels[0][rows],
            inputs.mask,
            inputs.advantages,
            kl_weights=inputs.kl_weights,
            old_logps=inputs.old_logps,
            ref_logps=inputs.ref_logps,
            bias=bias,  # b / temperature, as in lm_head_logprobs
            num_tokens=inputs.num_tokens,
            num_sequences=inputs.num_sequences,
            config=dataclasses.replace(inputs.config, temperature=temperature),
            sweep=forward_loss.sweep,
            vocab_parallel_group=vocab_parallel_group,
        )
    forward_loss.output = out
    scored = rows[inputs.mask]
    log_probs = labels.new_zeros(labels.shape, dtype=torch.float32)
    log_probs[0, scored] = out.logps[inputs.mask].float()
    entropy = None
    if return_entropy:
        entropy = torch.zeros_like(log_probs)
        entropy[0, scored] = out.entropy[inputs.mask].float()
    return log_probs, entropy, out.loss


def lm_head_outputs(model, hidden_states, labels, temperature, response_label_mask, return_entropy, forward_loss):
    """The fused forwards' head: ``(log_probs, entropy, apo_loss)``, the update's APO loss when the micro-batch asked
    for it (else None)."""
    if forward_loss is not None:
        return lm_head_forward_loss(model, hidden_states, labels, temperature, forward_loss, return_entropy)
    return (*lm_head_logprobs(model, hidden_states, labels, temperature, response_label_mask, return_entropy), None)


def causal_lm_forward(
    self,
    input_ids: Optional[torch.LongTensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.LongTensor] = None,
    past_key_values=None,
    inputs_embeds: Optional[torch.FloatTensor] = None,
    labels: Optional[torch.LongTensor] = None,
    use_cache: Optional[bool] = None,
    output_attentions: Optional[bool] = None,
    output_hidden_states: Optional[bool] = None,
    return_dict: Optional[bool] = None,
    cache_position: Optional[torch.LongTensor] = None,
    temperature: float = 1.0,
    shift_labels: Optional[torch.LongTensor] = None,
    response_label_mask: Optional[torch.Tensor] = None,
    return_entropy: bool = True,
    apo_forward_loss: Optional[ForwardLoss] = None,
    **_unused_loss_kwargs,
) -> CausalLMOutputWithAPOLoss:
    """Fused ``forward`` of a plain causal LM (any model verl's ``dense_common`` forward serves)."""
    outputs = forward_base_model(
        self,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
        cache_position=cache_position,
    )
    log_probs, entropy, update_loss = lm_head_outputs(
        self,
        outputs[0],
        next_token_labels(input_ids, labels, shift_labels),
        temperature,
        response_label_mask,
        return_entropy,
        apo_forward_loss,
    )
    return CausalLMOutputWithAPOLoss(
        log_probs=log_probs,
        entropy=entropy,
        apo_loss=update_loss,
        past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
    )


def qwen2_vl_causal_lm_forward(
    self,
    input_ids: Optional[torch.LongTensor] = None,
    labels: Optional[torch.LongTensor] = None,
    temperature: float = 1.0,
    shift_labels: Optional[torch.LongTensor] = None,
    response_label_mask: Optional[torch.Tensor] = None,
    return_entropy: bool = True,
    apo_forward_loss: Optional[ForwardLoss] = None,
    **kwargs,
) -> Qwen2VLCausalLMOutputWithAPOLoss:
    """Fused ``forward`` of Qwen2-VL / Qwen2.5-VL (images, videos and mrope positions via verl's base forward)."""
    outputs = qwen2_vl_forward(self, input_ids, **kwargs)
    log_probs, entropy, update_loss = lm_head_outputs(
        self,
        outputs[0],
        next_token_labels(input_ids, labels, shift_labels),
        temperature,
        response_label_mask,
        return_entropy,
        apo_forward_loss,
    )
    return Qwen2VLCausalLMOutputWithAPOLoss(
        log_probs=log_probs, entropy=entropy, apo_loss=update_loss, hidden_states=outputs.hidden_states
    )


def patch_forward_with_backends(model, use_fused_kernels: bool = False, fused_kernels_backend: Optional[str] = None):
    """verl's forward switch with the ``apo`` backend added; other backends go to verl's own switch."""
    if not (use_fused_kernels and fused_kernels_backend == BACKEND_NAME):
        return verl_patch_forward_with_backends(
            model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend
        )
    model_type = model.config.model_type
    if model_type in QWEN2_VL_MODEL_TYPES:
        model.__class__.forward = qwen2_vl_causal_lm_forward
    elif hasattr(model.config, "vision_config"):
        raise ValueError(
            f"fused_kernel_options.impl_backend=apo supports the VLMs {QWEN2_VL_MODEL_TYPES} and text-only causal "
            f"LMs, got {model_type!r}; use impl_backend=torch or triton for it"
        )
    else:
        model.__class__.forward = causal_lm_forward
    model._verl_fused_kernels_backend = BACKEND_NAME


def uses_apo_backend(engine) -> bool:
    options = engine.model_config.fused_kernel_options or {}
    return engine.model_config.use_fused_kernels and options.get("impl_backend", None) == BACKEND_NAME


def response_label_rows(micro_batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, valid)``, both ``(B, R)``: the packed position whose label is response token ``j`` of sequence ``i``
    (0 where ``valid`` is False, past that response's length ``r_i``).

    Sequence ``i`` occupies ``[start_i, end_i)`` of the packed ``input_ids``, its response the last ``r_i``
    tokens, so the positions predicting them are ``[end_i - r_i - 1, end_i - 1)`` (as verl's
    ``no_padding_2_padding`` slices them).
    """
    offsets = micro_batch["input_ids"].offsets()
    responses = micro_batch["responses"]
    if responses.is_nested:
        response_lens = responses.offsets().diff()
    else:
        response_lens = micro_batch["attention_mask"][:, micro_batch["prompts"].shape[1] :].sum(-1)
    response_lens = response_lens.to(offsets.device)
    index = torch.arange(int(response_lens.max()) if len(response_lens) else 0, device=offsets.device)
    valid = index < response_lens[:, None]
    rows = (offsets[1:] - response_lens - 1)[:, None] + index
    return torch.where(valid, rows, 0), valid


def packed_response_label_mask(engine, micro_batch) -> torch.Tensor:
    """``(1, packed length)`` bool: True where the label (next token) is a response token, padded and
    Ulysses-sliced like verl's ``shift_labels``."""
    rows, valid = response_label_rows(micro_batch)
    mask = torch.zeros(int(micro_batch["input_ids"].offsets()[-1]), dtype=torch.int64, device=rows.device)
    mask[rows[valid]] = 1
    mask = F.pad(mask.unsqueeze(0), (0, engine._get_packed_pad_size(mask.numel())))
    if engine.use_ulysses_sp:
        mask, _, _ = ulysses_pad_and_slice_inputs(
            mask, position_ids_rmpad=None, sp_size=engine.ulysses_sequence_parallel_size
        )
    return mask.bool()


def update_sweep(engine, micro_batch, loss_function, forward_only) -> Optional[str]:
    """``apo_loss``'s ``sweep`` when this ``forward_step`` is an APO actor update whose loss the fused forward can
    compute (``fused_kernel_options.sweep`` is not ``two-pass``); None: log-probs in the forward, loss after it.

    The forward computes it on the packed layout (``use_remove_padding``), without Ulysses sequence parallelism
    (each rank holds a slice of the sequences' rows, while the loss's sequence means need whole sequences), and not
    for the covariance loss modes (``COVARIANCE_LOSS_MODES``)."""
    if forward_only or not uses_apo_backend(engine):
        return None
    sweep = (engine.model_config.fused_kernel_options or {}).get("sweep", "auto")
    if sweep not in SWEEPS:
        raise ValueError(f"actor_rollout_ref.model.fused_kernel_options.sweep must be one of {SWEEPS}, got {sweep!r}")
    loss_mode = (
        loss_function.keywords["config"].policy_loss.get("loss_mode")
        if isinstance(loss_function, functools.partial) and loss_function.func is ppo_loss_with_apo
        else None
    )
    packed = tu.get_non_tensor_data(micro_batch, "use_remove_padding", True)
    # the covariance modes select tokens by the whole micro-batch's log-probs, known only after the forward
    if loss_mode not in LOSS_MODES or loss_mode in COVARIANCE_LOSS_MODES:
        return None
    if sweep == "two-pass" or not packed or engine.use_ulysses_sp:
        return None
    return sweep


def forward_step(self, micro_batch, loss_function, forward_only):
    """verl's ``FSDPEngineWithLMHead.forward_step``; on an APO actor update (:func:`update_sweep`) the micro-batch
    carries a :class:`~.loss.ForwardLoss`, so that the forward computes the loss, :func:`prepare_model_outputs` hands
    it on and the loss function returns it."""
    sweep = update_sweep(self, micro_batch, loss_function, forward_only)
    if sweep is not None:
        forward_loss = ForwardLoss(actor_config=loss_function.keywords["config"], sweep=sweep)
        tu.assign_non_tensor(micro_batch, **{FORWARD_LOSS_KEY: forward_loss})
    return verl_forward_step(self, micro_batch, loss_function, forward_only)


def prepare_model_inputs(self, micro_batch):
    """verl's ``FSDPEngineWithLMHead.prepare_model_inputs``, plus, for the apo backend, ``return_entropy`` (the
    entropy only when verl will read it, ``calculate_entropy``, as its ``prepare_model_outputs`` decides) and either
    the micro-batch's :class:`~.loss.ForwardLoss` with its checked inputs and response rows (an update whose loss the
    forward computes) or ``response_label_mask`` (log-probs of the response rows only)."""
    model_inputs, output_args = verl_prepare_model_inputs(self, micro_batch)
    if uses_apo_backend(self):
        model_inputs["return_entropy"] = bool(tu.get_non_tensor_data(micro_batch, "calculate_entropy", False))
    forward_loss = tu.get_non_tensor_data(micro_batch, FORWARD_LOSS_KEY, None)
    if forward_loss is not None:
        forward_loss.inputs = actor_loss_inputs(forward_loss.actor_config, micro_batch)
        rows, _ = response_label_rows(micro_batch)
        forward_loss.rows = rows.to(model_inputs["shift_labels"].device)
        model_inputs["apo_forward_loss"] = forward_loss
        return model_inputs, output_args
    # shift_labels is only there on the packed (remove-padding) fused path; the mask needs the response lengths.
    if "shift_labels" in model_inputs and "responses" in micro_batch.keys() and uses_apo_backend(self):
        model_inputs["response_label_mask"] = packed_response_label_mask(self, micro_batch).to(
            model_inputs["shift_labels"].device
        )
    return model_inputs, output_args


def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
    """verl's ``FSDPEngineWithLMHead.prepare_model_outputs``, plus the update's ``apo_loss`` when the forward computed
    it (verl's keeps only the log-probs and the entropy)."""
    model_output = verl_prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func)
    update_loss = getattr(output, "apo_loss", None)
    if update_loss is not None:
        model_output["apo_loss"] = update_loss
    return model_output


def get_input_embeds(
    model,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    pixel_values_videos=None,
    image_grid_thw=None,
    video_grid_thw=None,
):
    """verl's Qwen2-VL ``_get_input_embeds``, with its text-only branch working under transformers 5.

    A micro-batch without images (verl's padding samples make them: 6 samples padded to 8 give an update
    micro-batch of two) still runs the vision tower, on one dummy patch grid, so that its parameters take part
    in every rank's forward and backward (FSDP's collectives must match across ranks). verl 0.9.1 then calls
    ``.mean()`` on the tower's output, an object under transformers 5 (``BaseModelOutputWithPooling``): that
    branch runs here, reading the tensor through verl's own ``unpack_visual_output``. With images, verl's.
    """
    if pixel_values is not None or pixel_values_videos is not None:
        return verl_get_input_embeds(
            model, input_ids, attention_mask, pixel_values, pixel_values_videos, image_grid_thw, video_grid_thw
        )
    inputs_embeds = model.get_input_embeddings()(input_ids)
    vision = model.config.vision_config
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    grid = torch.tensor([[1, 4, 4]], dtype=torch.long, device=inputs_embeds.device)  # 16 patches
    patches = torch.zeros((16, patch_dim), dtype=inputs_embeds.dtype, device=inputs_embeds.device)
    image_embeds, _ = unpack_visual_output(model.visual(patches, grid_thw=grid))
    inputs_embeds = inputs_embeds + 0.0 * image_embeds.mean()
    return inputs_embeds, None if attention_mask is None else attention_mask.to(inputs_embeds.device)
