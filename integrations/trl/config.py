"""``APOGRPOConfig``: TRL's ``GRPOConfig`` plus the APO fields."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from trl import GRPOConfig

from apo_kernels import APOConfig

#: TRL loss types whose policy term is APO's clipped surrogate, and the aggregation (verl name) each implies.
LOSS_TYPE_AGG_MODES = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "cispo": "token-mean",
    "sapo": "seq-mean-token-mean",
    # LUSPO: each sequence's token sum, averaged (with sequence-level ratios, as its paper, or token-level ones)
    "luspo": "seq-mean-token-sum",
    "vespo": "token-mean",
}
#: Loss types normalized by the accumulation window's share of the generation batch's tokens.
GLOBAL_TOKEN_LOSS_TYPES = ("dapo", "cispo", "vespo")


@dataclass
class APOGRPOConfig(GRPOConfig):
    r"""Configuration of [`APOTrainer`]: every [`trl.GRPOConfig`] field, plus the APO fields below.

    TRL fields keep their meaning: `beta` is APO's KL coefficient, `epsilon` / `epsilon_high` its clip range,
    `delta` its two-sided clip, `temperature` divides the logits, `scale_rewards` is `"group"` (divide by the
    group std), `"batch"` (by the batch's) or `"none"` (Dr.GRPO), and `loss_type` (`"grpo"`, `"bnpo"`,
    `"dapo"`, `"dr_grpo"`, `"luspo"`, `"cispo"` or `"sapo"`) sets the policy term, the aggregation and the
    normalization across gradient accumulation exactly as it does in `GRPOTrainer` (`"luspo"`: each sequence's
    token sum, averaged; `"cispo"`: `-sg(min(rho, epsilon_high)) A logp`, APO's `policy_loss="cispo"`;
    `"sapo"`: the soft gate `-sigmoid(tau (rho - 1)) 4 / tau A` with `sapo_temperature_pos/neg`, APO's
    `policy_loss="sapo"`; `"vespo"`: `-sg(phi(w)) A logp` with VESPO's gamma weight of the sequence ratio and
    `vespo_k_pos/lambda_pos/k_neg/lambda_neg`, APO's `policy_loss="vespo"`). `importance_sampling_level="sequence"` (GSPO) gives every loss type each
    sequence's ratio, as in `GRPOTrainer`. Two defaults change to the released APO recipe's:
    `beta=1e-3` (DADS reshapes the KL term, so `beta=0` disables it) and `use_bias_correction_kl=False` (the KL
    term is not weighted by the importance ratio; True is rejected).

    Correctness (which responses count as *correct* for STCR and DADS) is decided by `correctness_threshold`
    on the total weighted reward (released recipe: accuracy 1 + format bonus 0.5, correct when the total is
    >= 1), or on the reward of the function named by `correctness_reward_func` (e.g. `"accuracy_reward"`).
    """

    beta: float = field(
        default=1e-3,
        metadata={"help": "KL coefficient (released APO recipe: 1e-3). DADS scales it per response."},
    )
    use_bias_correction_kl: bool = field(
        default=False,
        metadata={"help": "Must stay False: APO's KL term (released recipe) is not weighted by the importance ratio."},
    )
    dads: bool = field(
        default=True,
        metadata={"help": "Difficulty-Adaptive Divergence Shaping: shrink the KL weight of positive responses on hard prompts."},
    )
    dads_variant: str = field(
        default="accuracy",
        metadata={"help": "DADS curve: 'accuracy' (released, 1 - exp(-s (1 - d))) or 'difficulty' (exp(-s d))."},
    )
    dads_scale: float = field(default=math.e, metadata={"help": "DADS scale `s` (released: e)."})
    stcr: bool = field(
        default=True,
        metadata={"help": "Suboptimal Trajectory Complexity Regularization: amplify the negative advantage of long wrong answers."},
    )
    stcr_base: float = field(default=1.00001, metadata={"help": "STCR base: w = 1 - base ** -(L - Lbar) (released 1.00001)."})
    positive_by: str = field(
        default="advantage",
        metadata={"help": "What makes a response positive for DADS: 'advantage' (> 0 after STCR, released) or 'correct'."},
    )
    adv_eps: float = field(
        default=1e-9,
        metadata={"help": "Added to the group reward std (released APO: 1e-9; GRPOTrainer uses 1e-4)."},
    )
    kl_estimator: str = field(
        default="k3",
        metadata={"help": "KL estimator: 'k1', 'k2' or 'k3' (released and GRPOTrainer: k3)."},
    )
    kl_agg_mode: Optional[str] = field(
        default=None,
        metadata={
            "help": "Aggregation of the KL term (verl names). None aggregates it like the policy term, as "
            "GRPOTrainer does; the released APO recipe uses 'seq-mean-token-mean' with loss_type='bnpo'."
        },
    )
    correctness_reward_func: Optional[str] = field(
        default=None,
        metadata={
            "help": "Name of the reward function that decides correctness (as logged under rewards/<name>); "
            "None uses the total weighted reward."
        },
    )
    correctness_threshold: float = field(
        default=1.0,
        metadata={"help": "A response is correct when its (total or named) reward is >= this value."},
    )
    apo_backend: str = field(
        default="auto",
        metadata={"help": "apo_loss backend: 'auto' (Triton on CUDA), 'torch' or 'triton'."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in LOSS_TYPE_AGG_MODES:
            raise ValueError(
                f"APOTrainer supports loss_type in {sorted(LOSS_TYPE_AGG_MODES)}, got {self.loss_type!r}"
            )
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {self.scale_rewards!r}")
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "APOTrainer decides correctness and advantages from the weighted sum of the rewards: set "
                f"multi_objective_aggregation='sum_then_normalize', got {self.multi_objective_aggregation!r}"
            )
        unsupported = {
            "off_policy_mask_threshold": (self.off_policy_mask_threshold is not None, "None"),
            "use_bias_correction_kl": (self.use_bias_correction_kl, "False"),
            "use_adaptive_entropy": (self.use_adaptive_entropy, "False"),
        }
        for name, (is_set, supported) in unsupported.items():
            if is_set:
                raise ValueError(
                    f"APOTrainer computes the loss with apo_kernels.apo_loss, which has no equivalent of "
                    f"{name}={getattr(self, name)!r}; set {name}={supported}"
                )
        self.to_apo_config()  # validate the APO fields now rather than at the first loss step

    def to_apo_config(self) -> APOConfig:
        """The :class:`apo_kernels.APOConfig` these arguments describe."""
        agg_mode = LOSS_TYPE_AGG_MODES[self.loss_type]
        epsilon_high = float(self.epsilon if self.epsilon_high is None else self.epsilon_high)
        cispo = self.loss_type == "cispo"
        return APOConfig(
            beta=float(self.beta),
            kl_estimator=self.kl_estimator,
            policy_loss=self.loss_type if self.loss_type in ("cispo", "sapo", "vespo") else "ppo",
            importance_sampling_level=self.importance_sampling_level,
            sapo_tau_pos=float(self.sapo_temperature_pos),
            sapo_tau_neg=float(self.sapo_temperature_neg),
            vespo_k_pos=float(self.vespo_k_pos),
            vespo_lambda_pos=float(self.vespo_lambda_pos),
            vespo_k_neg=float(self.vespo_k_neg),
            vespo_lambda_neg=float(self.vespo_lambda_neg),
            # TRL's CISPO clamps the ratio at epsilon_high itself, and not below
            eps_low=1.0 if cispo else float(self.epsilon),
            eps_high=epsilon_high - 1.0 if cispo else epsilon_high,
            ratio_cap=None if self.delta is None else float(self.delta),
            temperature=float(self.temperature),
            loss_agg_mode=agg_mode,
            kl_agg_mode=agg_mode if self.kl_agg_mode is None else self.kl_agg_mode,
            loss_agg_norm=self.max_completion_length if self.loss_type == "dr_grpo" else None,
            dads=self.dads,
            dads_variant=self.dads_variant,
            dads_scale=float(self.dads_scale),
            stcr=self.stcr,
            stcr_base=float(self.stcr_base),
            positive_by=self.positive_by,
            adv_eps=float(self.adv_eps),
            scale_rewards=self.scale_rewards != "none",
            reward_std="batch" if self.scale_rewards == "batch" else "group",
            entropy_coef=float(self.entropy_coef),
            top_entropy_quantile=float(self.top_entropy_quantile),
        )
