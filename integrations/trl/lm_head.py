"""An APO head on a TRL policy: ``model(..., apo_inputs=...)`` returns the APO loss from the last hidden states.

The loss runs *inside* the model's forward, like TRL's own fused LM head: DDP, FSDP and DeepSpeed hook the
wrapped model's forward, and ZeRO-3 relies on those hooks for the LM head's gradient reduction.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import transformers
from packaging.version import Version
from transformers.utils import ModelOutput

from apo_kernels import APOConfig, apo_loss

from ..lm_head import lm_head_for_loss

#: Text-config fields that change the logits beyond ``hidden @ W.T + b``; apo_loss does not apply them.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


class APOLossInputs:
    """Everything but the backbone inputs that :func:`apo_kernels.apo_loss` needs for one micro-batch.

    ``targets``/``mask`` (and the log-probs) cover the completion, the last ``C`` positions of the sequence.

    A plain class, not a dataclass: FSDP2's forward hook (``MixedPrecisionPolicy.cast_forward_inputs``) casts the
    floating tensors of the forward's arguments, dataclass fields included, to the policy's ``param_dtype``, so the
    log-probs, advantages and KL weights reached the loss in bf16; it passes other objects through as they are.
    """

    def __init__(
        self,
        targets: torch.Tensor,  # (B, C) completion token ids
        mask: torch.Tensor,  # (B, C) loss mask
        advantages: torch.Tensor,  # (B,) or (B, C)
        kl_weights: Optional[torch.Tensor],  # (B,)
        old_logps: Optional[torch.Tensor],  # (B, C)
        ref_logps: Optional[torch.Tensor],  # (B, C)
        num_tokens: Optional[Union[float, torch.Tensor]],
        num_sequences: Optional[int],
        config: APOConfig,
        backend: str = "auto",
        entropy_quantile_group: Any = None,  # the processes whose tokens set the entropy threshold (TRL: all)
        sampling_logps: Optional[torch.Tensor] = None,  # (B, C) the sampler's, for the off-policy mask
    ):
        self.targets = targets
        self.mask = mask
        self.advantages = advantages
        self.kl_weights = kl_weights
        self.old_logps = old_logps
        self.ref_logps = ref_logps
        self.num_tokens = num_tokens
        self.num_sequences = num_sequences
        self.config = config
        self.backend = backend
        self.entropy_quantile_group = entropy_quantile_group
        self.sampling_logps = sampling_logps


@dataclass
class APOModelOutput(ModelOutput):
    """What ``model(..., apo_inputs=...)`` returns: the loss, detached per-token log-probs/entropies, metrics."""

    loss: Optional[torch.Tensor] = None
    log_probs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    metrics: Optional[dict] = None


def check_supported_model(model: torch.nn.Module) -> None:
    """Reject models whose logits apo_loss cannot reproduce from ``hidden @ W.T + b``."""
    text_config = model.config.get_text_config()
    transforms = {name: getattr(text_config, name, None) for name in _LOGIT_TRANSFORMS}
    transforms = {name: value for name, value in transforms.items() if value not in (None, 1, 1.0)}
    if transforms:
        raise ValueError(
            f"APOTrainer computes log-probs as log_softmax(hidden @ lm_head.weight.T / temperature); "
            f"{type(model).__name__} also applies {transforms} to its logits, which apo_loss does not support"
        )
    if model.get_output_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no LM head (get_output_embeddings() is None)")


def add_apo_head(model: torch.nn.Module) -> None:
    """Patch ``model.forward`` so that ``model(**backbone_inputs, apo_inputs=APOLossInputs(...))`` returns an
    :class:`APOModelOutput`; without ``apo_inputs`` the previous forward (e.g. TRL's fused head) runs unchanged."""
    check_supported_model(model)
    previous_forward = model.forward
    # Before transformers 5, vision-language models expose their language backbone as `model`.
    backbone_attr = "base_model"
    if model.config.get_text_config() is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        backbone_attr = "model"

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against the forward's signature
    def forward(self, *args, apo_inputs: Optional[APOLossInputs] = None, **kwargs):
        if apo_inputs is None:
            return previous_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        backbone = getattr(self, backbone_attr)  # looked up per call: FSDP and PEFT replace modules after patching
        hidden_states = backbone(*args, **kwargs).last_hidden_state
        completion_length = apo_inputs.targets.shape[1]
        # Position t predicts token t + 1: the completion's tokens are predicted by the C positions before them.
        hidden = hidden_states[:, -completion_length - 1 : -1]
        lm_head = self.get_output_embeddings()
        hidden = hidden.to(lm_head.weight.device)  # with device_map, the backbone may end on another device
        # apo_loss picks its own compute precision (fp32 accumulation); autocast would override it.
        with (
            lm_head_for_loss(self, lm_head, temperature=apo_inputs.config.temperature) as (
                weight,
                bias,
                vocab_parallel_group,
            ),
            torch.autocast(hidden.device.type, enabled=False),
        ):
            out = apo_loss(
                hidden,
                weight,
                apo_inputs.targets,
                apo_inputs.mask,
                apo_inputs.advantages,
                kl_weights=apo_inputs.kl_weights,
                old_logps=apo_inputs.old_logps,
                ref_logps=apo_inputs.ref_logps,
                sampling_logps=apo_inputs.sampling_logps,
                bias=bias,  # already b / temperature: TRL divides the biased logits (lm_head_for_loss)
                num_tokens=apo_inputs.num_tokens,
                num_sequences=apo_inputs.num_sequences,
                config=apo_inputs.config,
                backend=apo_inputs.backend,
                vocab_parallel_group=vocab_parallel_group,
                entropy_quantile_group=apo_inputs.entropy_quantile_group,
            )
        return APOModelOutput(loss=out.loss, log_probs=out.logps, entropy=out.entropy, metrics=out.metrics)

    model.forward = types.MethodType(forward, model)
