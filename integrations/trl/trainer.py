"""``APOTrainer``: TRL's ``GRPOTrainer`` with APO's group stage and the fused APO loss."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional

import torch
from accelerate.utils import is_peft_model
from trl import GRPOTrainer

from apo_kernels import GroupAdvantages, group_advantages
from apo_kernels.objective import policy_term_factor

from .config import GLOBAL_TOKEN_LOSS_TYPES, APOGRPOConfig
from .lm_head import APOLossInputs, add_apo_head

#: Per-sequence model inputs TRL keeps in a training batch besides the token ids (vision-language models).
MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


class APOTrainer(GRPOTrainer):
    """`GRPOTrainer` for APO (Asymmetric Policy Optimization, arXiv 2506.21655): swap it in with an
    [`APOGRPOConfig`].

    - Group stage: once per generation batch, after TRL has scored it (rewards gathered over all processes),
      :func:`apo_kernels.group_advantages` turns rewards, correctness and completion lengths into STCR-scaled
      advantages and DADS KL weights; both travel with the batch through TRL's buffering, shuffling and
      gradient accumulation.
    - Loss: the policy backbone runs to the last hidden states of the completion tokens (with the images for
      vision-language models) and :func:`apo_kernels.apo_loss` consumes them with the LM head weight, never
      materializing the logits; old and reference log-probs are TRL's.
    """

    _tag_names = ["trl", "grpo", "apo"]
    _name = "APO"

    def __init__(self, model, reward_funcs, args: Optional[APOGRPOConfig] = None, **kwargs):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = APOGRPOConfig(f"{model_name.split('/')[-1]}-APO")
        if not isinstance(args, APOGRPOConfig):
            raise TypeError(
                f"APOTrainer needs an APOGRPOConfig (a GRPOConfig with the APO fields), got {type(args).__name__}; "
                "construct an APOGRPOConfig with the same arguments instead"
            )
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        if self.aux_loss_enabled:
            raise ValueError("APOTrainer does not add the MoE router load-balancing loss; set router_aux_loss_coef=0.0")
        self.apo_config = args.to_apo_config()
        if args.correctness_reward_func is not None and args.correctness_reward_func not in self.reward_func_names:
            raise ValueError(
                f"correctness_reward_func={args.correctness_reward_func!r} is not one of the reward functions "
                f"{self.reward_func_names}"
            )
        add_apo_head(self.model.get_base_model() if is_peft_model(self.model) else self.model)
        self._apo_scores = None  # (gathered rewards per function, local completion lengths) of the last scoring

    # Group stage --------------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        # Lengths before any truncation masking: STCR compares how long the answers actually are.
        self._apo_scores = (rewards_per_func, [len(ids) for ids in completion_ids_list])
        return rewards_per_func

    def apo_group_stage(
        self, rewards_per_func: torch.Tensor, lengths: torch.Tensor, group_size: int
    ) -> GroupAdvantages:
        """APO's group stage on the whole (all-process) generation batch, groups contiguous of ``group_size``.

        Unscorable completions (every reward function returned None) count as reward 0 in their group and get
        advantage 0, so they do not move the policy.
        """
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        name = self.args.correctness_reward_func
        scores = rewards if name is None else rewards_per_func[:, self.reward_func_names.index(name)]
        correct = scores >= self.args.correctness_threshold  # NaN compares False: an unscored answer is wrong
        stage = group_advantages(
            rewards, group_size=group_size, correct=correct, lengths=lengths, config=self.apo_config
        )
        return dataclasses.replace(stage, advantages=stage.advantages.masked_fill(unscorable, 0.0))

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        rewards_per_func, local_lengths = self._apo_scores
        self._apo_scores = None
        device = self.accelerator.device
        lengths = self.accelerator.gather(torch.tensor(local_lengths, device=device))
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        stage = self.apo_group_stage(rewards_per_func, lengths, group_size)

        # TRL replaced its advantages with this process's slice of the generation batch: do the same.
        num_local = len(local_lengths)
        local = slice(self.accelerator.process_index * num_local, (self.accelerator.process_index + 1) * num_local)
        output["advantages"] = stage.advantages[local]
        output["kl_weights"] = stage.kl_weights[local]

        # The completions table shows the advantages the loss uses.
        for _ in range(min(len(stage.advantages), len(self._logs["advantages"]))):
            self._logs["advantages"].pop()
        self._logs["advantages"].extend(stage.advantages.tolist())

        # The whole generation batch (every process's responses) was staged: its metrics are global already.
        for name, value in stage.metrics().items():
            self._metrics[mode][f"apo/{name}"].append(value.item())
        return output

    # Resuming -----------------------------------------------------------------------------------------------

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Trainer's resume, except for checkpoints whose weights are saved under other names than the model's.

        transformers >= 4.52 saves Qwen2.5-VL (and every model with a checkpoint conversion mapping) under the
        original checkpoint names (``model.layers.*``, ``visual.*``) while its modules are named
        ``model.language_model.*`` and ``model.visual.*``; Trainer loads the file with ``strict=False`` and so
        loads nothing: the run silently restarts from its initial weights (huggingface/transformers#43701).
        Such checkpoints load through ``from_pretrained``, which renames the keys, then strictly.
        """
        target = self.accelerator.unwrap_model(self.model if model is None else model)
        saved = _saved_weight_names(resume_from_checkpoint)
        plain = not (self.is_fsdp_enabled or self.is_deepspeed_enabled or is_peft_model(target))
        if not plain or saved is None or saved <= set(target.state_dict()):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        loaded = type(target).from_pretrained(resume_from_checkpoint, dtype="auto", device_map="cpu")
        target.load_state_dict(loaded.state_dict(), strict=True)

    # Loss ---------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        backbone_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        backbone_inputs.update({key: inputs[key] for key in MULTIMODAL_KEYS if inputs.get(key) is not None})

        advantages, old_logps = inputs["advantages"], inputs.get("old_per_token_logps")
        # the off-policy mask's sampler log-probs: vLLM's when TRL has them, else the old ones (GRPOTrainer's rule)
        sampling_logps = inputs.get("sampling_per_token_logps", old_logps)
        if "importance_sampling_ratio" in inputs and self.loss_type == "vespo":
            # VESPO adds vLLM's IS log-weights (clamped to [log 1e-8, 20]) to its sequence's log-ratio and does not
            # weight the term: lowering the old log-probs by them does that (TRL clamps each token's log-ratio to
            # +-20 apart from them; apo_loss clamps their sum).
            if old_logps is None:
                raise ValueError("loss_type='vespo' with vLLM's importance weights needs old_per_token_logps")
            log_weights = inputs["importance_sampling_ratio"].log().clamp(math.log(1e-8), 20.0).expand_as(mask)
            old_logps = old_logps - torch.where(mask.bool(), log_weights, 0.0)
        elif "importance_sampling_ratio" in inputs:
            # vLLM's IS correction w > 0 multiplies the policy term: per-token advantages w A (a sequence ratio's
            # term takes the sequence's mean w); the KL term is not corrected, as in GRPOTrainer.
            weights = inputs["importance_sampling_ratio"].expand_as(mask)
            advantages = advantages.unsqueeze(1) * policy_term_factor(weights, mask.bool(), self.apo_config)

        # TRL's normalization: "dapo" and "cispo" divide by the accumulation window's share of the generation
        # batch's tokens; the other loss types aggregate each micro-batch and divide by the accumulation steps.
        window = self.current_gradient_accumulation_steps if mode == "train" else 1
        num_tokens = num_sequences = None
        if self.loss_type in GLOBAL_TOKEN_LOSS_TYPES:
            num_tokens = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_tokens = num_tokens * window / self.args.steps_per_generation
            num_sequences = completion_ids.shape[0] * window

        config = self.apo_config
        if self._entropy_bonus_enabled:
            # GRPOTrainer's coefficient (its adaptive one applies from the step after the entropy fell to the target);
            # its bonus is divided by the accumulation steps, as the other loss types' whole loss is below
            coef = self.entropy_coef
            if self.use_adaptive_entropy and self._last_world_entropy > self.args.entropy_target:
                coef = 0.0
            scale = window if self.loss_type in GLOBAL_TOKEN_LOSS_TYPES else 1
            config = dataclasses.replace(config, entropy_coef=coef / scale)

        apo_inputs = APOLossInputs(
            targets=completion_ids,
            mask=mask,
            advantages=advantages,
            kl_weights=inputs["kl_weights"],
            old_logps=old_logps,
            ref_logps=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            num_tokens=num_tokens,
            num_sequences=num_sequences,
            config=config,
            backend=self.args.apo_backend,
            # GRPOTrainer takes the entropy quantile over every process's tokens
            entropy_quantile_group=torch.distributed.group.WORLD if self.accelerator.num_processes > 1 else None,
            sampling_logps=sampling_logps,
        )
        with self.accelerator.autocast():
            out = model(**backbone_inputs, apo_inputs=apo_inputs)
        loss = out.loss if self.loss_type in GLOBAL_TOKEN_LOSS_TYPES else out.loss / window
        self._log_loss_metrics(mode, out.metrics, mask)
        if self._entropy_bonus_enabled:
            self._entropy_bonus_step(mode, out, config.entropy_coef)
        return loss

    def _entropy_bonus_step(self, mode: str, out, coef: float) -> None:
        """GRPOTrainer's bookkeeping of its entropy bonus: the loss without it (``policy_loss``), the adaptive
        coefficient's window of entropies and, at each optimizer step, its update over all processes, and the
        coefficient logged (``entropy_coef``). Its state is ``GRPOTrainer``'s, saved and restored with checkpoints."""
        metrics = out.metrics
        policy_loss = out.loss.detach() + coef * metrics["bonus_entropy"]
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":
            tokens = metrics["bonus_tokens"]
            stats = torch.stack([metrics["bonus_entropy"] * tokens, tokens])
            window = self._entropy_window_stats
            self._entropy_window_stats = stats if window is None else window + stats
            if self.accelerator.sync_gradients:
                totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
                delta = self.args.entropy_coef_delta
                if world_entropy <= self.args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + delta, self.args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - delta, self.args.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    def _log_loss_metrics(self, mode: str, metrics: dict[str, torch.Tensor], mask: torch.Tensor) -> None:
        """TRL's loss metrics over all processes' micro-batches: token means, and with sequence ratios the clip
        fractions are sequence means (over every completion, as GRPOTrainer counts them)."""
        num_tokens = mask.sum().float()

        def global_mean(value: torch.Tensor, weight: torch.Tensor, count: torch.Tensor) -> float:
            """sum(value * weight) / sum(count) over the processes."""
            totals = self.accelerator.reduce(torch.stack([value.float() * weight, count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        global_token_mean = lambda value: global_mean(value, num_tokens, num_tokens)
        clip_mean = global_token_mean
        nonempty, sequences = mask.any(-1).sum().float(), torch.tensor(float(mask.shape[0]), device=mask.device)
        if self.apo_config.sequence_ratio:  # apo_loss's are means over non-empty sequences
            clip_mean = lambda value: global_mean(value, nonempty, sequences)

        logged = self._metrics[mode]
        if self.beta != 0.0:
            logged["kl"].append(global_token_mean(metrics["kl"]))
        logged["entropy"].append(global_token_mean(metrics["entropy"]))
        low, high = clip_mean(metrics["clip_frac_low"]), clip_mean(metrics["clip_frac_high"])
        if self.loss_type == "cispo":  # TRL's one CISPO clip metric: ratio above its bound, positive advantage
            logged["cispo_clip_ratio"].append(high)
        elif self.loss_type == "vespo":  # over every completion; an empty one has ratio 1, weight 1
            phi_total = metrics["vespo_phi_mean"] * nonempty + (sequences - nonempty)
            logged["vespo/phi_seq_mean"].append(global_mean(phi_total, torch.ones_like(sequences), sequences))
        elif self.loss_type != "sapo":  # SAPO's soft gate clips nothing
            logged["clip_ratio/low_mean"].append(low)
            logged["clip_ratio/high_mean"].append(high)
            logged["clip_ratio/region_mean"].append(low + high)  # the two regions are disjoint (sign of A)
        if self.apo_config.dads and self.beta != 0.0:
            logged["apo/kl_weight/token_mean"].append(global_token_mean(metrics["kl_weight_mean"]))


def _saved_weight_names(checkpoint: str) -> Optional[set[str]]:
    """The tensor names of a checkpoint's safetensors weights (one file or an index), or None when it has none."""
    from safetensors import safe_open
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    single, index = os.path.join(checkpoint, SAFE_WEIGHTS_NAME), os.path.join(checkpoint, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            return set(f.keys())
    if os.path.isfile(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    return None
