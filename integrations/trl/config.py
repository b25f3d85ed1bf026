"""``APOGRPOConfig``: TRL's ``GRPOConfig`` plus the APO fields."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

from trl import GRPOConfig

from apo_kernels import APOConfig
from apo_kernels.inputs import BACKENDS

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

#: The form of APOConfig's validation errors (``apo_kernels.config._require``).
_APO_CONFIG_ERROR = re.compile(r"APOConfig\.(?P<field>\w+) must be (?P<rule>.*), got .*", re.DOTALL)


class _Source(NamedTuple):
    """Where one APOConfig field comes from: a row of :meth:`APOGRPOConfig.apo_sources`."""

    argument: Optional[str]  # the APOGRPOConfig argument it is read from; None: fixed by the loss type
    value: Any  # that argument's value, as the user set it
    apo_value: Any  # the APOConfig field's value
    rule: Optional[str] = None  # what the argument must be, where apo_value is not the argument's own value


def _number(value):
    """``float(value)`` where it converts; otherwise ``value`` itself (e.g. None), for APOConfig to judge."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _minus_one(value):
    """CISPO's upper bound ``epsilon_high`` as APOConfig's ``eps_high`` (``1 + eps_high`` is the bound)."""
    number = _number(value)
    return number - 1.0 if isinstance(number, float) else number


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
    `vespo_k_pos/lambda_pos/k_neg/lambda_neg`, APO's `policy_loss="vespo"`).
    `importance_sampling_level="sequence"` (GSPO) gives every loss type each sequence's ratio, as in
    `GRPOTrainer`. `use_bias_correction_kl` (default True, as `GRPOConfig`'s) weights each token's KL by its
    importance ratio (APO's `kl_bias_correction`; with `importance_sampling_level="sequence"` the sequence's ratio,
    as `GRPOTrainer` broadcasts it); the released APO recipe used False. With `loss_type="vespo"` and `beta > 0` it
    must be False. One default
    changes to the released APO recipe's: `beta=1e-3` (DADS reshapes the KL term, so `beta=0` disables it).
    `off_policy_mask_threshold` (DeepSeek-V3.2's off-policy sequence mask) reads vLLM's sampling log-probs when
    TRL has them, else the old ones, as `GRPOTrainer` does.

    Correctness (which responses count as *correct* for STCR and DADS) is decided by `correctness_threshold`
    on the total weighted reward (released recipe: accuracy 1 + format bonus 0.5, correct when the total is
    >= 1), or on the reward of the function named by `correctness_reward_func` (e.g. `"accuracy_reward"`).
    """

    beta: float = field(
        default=1e-3,
        metadata={"help": "KL coefficient (released APO recipe: 1e-3). DADS scales it per response."},
    )
    dads: bool = field(
        default=True,
        metadata={
            "help": "Difficulty-Adaptive Divergence Shaping: shrink the KL weight of positive responses on hard "
            "prompts."
        },
    )
    dads_variant: str = field(
        default="accuracy",
        metadata={"help": "DADS curve: 'accuracy' (released, 1 - exp(-s (1 - d))) or 'difficulty' (exp(-s d))."},
    )
    dads_scale: float = field(default=math.e, metadata={"help": "DADS scale `s` (released: e)."})
    stcr: bool = field(
        default=True,
        metadata={
            "help": "Suboptimal Trajectory Complexity Regularization: amplify the negative advantage of long wrong "
            "answers."
        },
    )
    stcr_base: float = field(
        default=1.00001, metadata={"help": "STCR base: w = 1 - base ** -(L - Lbar) (released 1.00001)."}
    )
    positive_by: str = field(
        default="advantage",
        metadata={
            "help": "What makes a response positive for DADS: 'advantage' (> 0 after STCR, released) or 'correct'."
        },
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
            raise ValueError(f"APOTrainer supports loss_type in {sorted(LOSS_TYPE_AGG_MODES)}, got {self.loss_type!r}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {self.scale_rewards!r}")
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "APOTrainer decides correctness and advantages from the weighted sum of the rewards: set "
                f"multi_objective_aggregation='sum_then_normalize', got {self.multi_objective_aggregation!r}"
            )
        threshold = self.correctness_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold):
            # NaN would count every answer as wrong, silently turning DADS and STCR off
            raise ValueError(f"correctness_threshold must be a finite float, got {threshold!r}")
        if self.apo_backend not in BACKENDS:
            raise ValueError(f"apo_backend must be one of {BACKENDS}, got {self.apo_backend!r}")
        self.to_apo_config()  # validate the APO fields now rather than at the first loss step

    def apo_sources(self) -> dict[str, _Source]:
        """The translation table: each APOConfig field, the argument of this config it comes from, and its value.

        :meth:`to_apo_config` builds the APOConfig from it, and names its errors after the arguments in it.
        """

        def arg(name, convert=lambda value: value, rule=None):
            value = getattr(self, name)
            return _Source(name, value, convert(value), rule)

        cispo = self.loss_type == "cispo"
        # TRL's epsilon_high=None means epsilon_high=epsilon, for every loss type
        high = "epsilon" if self.epsilon_high is None else "epsilon_high"
        if cispo:  # TRL's CISPO clamps the ratio at epsilon_high itself, and not below
            eps_low = _Source(None, None, 1.0)
            eps_high = arg(
                high,
                _minus_one,
                "a finite float > 0 with loss_type='cispo' (the largest importance weight CISPO keeps"
                + (")" if high == "epsilon_high" else "; epsilon_high is None, so epsilon sets it)"),
            )
        else:
            eps_low, eps_high = arg("epsilon", _number), arg(high, _number)
        return {
            "beta": arg("beta", _number),
            "kl_estimator": arg("kl_estimator"),
            "kl_bias_correction": arg("use_bias_correction_kl"),
            "policy_loss": arg("loss_type", lambda value: value if value in ("cispo", "sapo", "vespo") else "ppo"),
            "importance_sampling_level": arg("importance_sampling_level"),
            "sapo_tau_pos": arg("sapo_temperature_pos", _number),
            "sapo_tau_neg": arg("sapo_temperature_neg", _number),
            "vespo_k_pos": arg("vespo_k_pos", _number),
            "vespo_lambda_pos": arg("vespo_lambda_pos", _number),
            "vespo_k_neg": arg("vespo_k_neg", _number),
            "vespo_lambda_neg": arg("vespo_lambda_neg", _number),
            "eps_low": eps_low,
            "eps_high": eps_high,
            "ratio_cap": arg("delta", _number),
            "temperature": arg("temperature", _number),
            "loss_agg_mode": arg("loss_type", LOSS_TYPE_AGG_MODES.get),
            "kl_agg_mode": arg("loss_type", LOSS_TYPE_AGG_MODES.get)
            if self.kl_agg_mode is None
            else arg("kl_agg_mode"),
            # Dr.GRPO divides each sequence's token sum by the max completion length; other types leave it unset
            "loss_agg_norm": arg("max_completion_length") if self.loss_type == "dr_grpo" else _Source(None, None, None),
            "dads": arg("dads"),
            "dads_variant": arg("dads_variant"),
            "dads_scale": arg("dads_scale", _number),
            "stcr": arg("stcr"),
            "stcr_base": arg("stcr_base", _number),
            "positive_by": arg("positive_by"),
            "adv_eps": arg("adv_eps", _number),
            "scale_rewards": arg("scale_rewards", lambda value: value != "none"),
            "reward_std": arg("scale_rewards", lambda value: "batch" if value == "batch" else "group"),
            "entropy_coef": arg("entropy_coef", _number),
            # GRPOTrainer's bonus is the mean entropy of the tokens its policy term trains on, whatever the loss type
            "entropy_token_mean": _Source(None, None, True),
            "top_entropy_quantile": arg("top_entropy_quantile", _number),
            "off_policy_mask_threshold": arg("off_policy_mask_threshold", _number),
        }

    def to_apo_config(self) -> APOConfig:
        """The :class:`apo_kernels.APOConfig` these arguments describe; its errors name these arguments."""
        sources = self.apo_sources()
        try:
            return APOConfig(**{name: source.apo_value for name, source in sources.items()})
        except ValueError as error:
            raise _in_argument_terms(error, sources) from None


def _in_argument_terms(error: ValueError, sources: dict[str, _Source]) -> ValueError:
    """APOConfig's ``error``, restated for the argument the user set: its name, its rule, the value it was given."""
    match = _APO_CONFIG_ERROR.fullmatch(str(error))
    source = sources.get(match["field"]) if match else None
    if source is None or source.argument is None:  # not a field the user sets: a bug here, reported as it is
        return error
    rule = source.rule or match["rule"]
    for name, other in sources.items():  # fields the rule mentions (e.g. "with policy_loss='sapo'")
        if other.argument is not None:
            rule = rule.replace(f"{name}={other.apo_value!r}", f"{other.argument}={other.value!r}")
            rule = re.sub(rf"\b{name}\b", other.argument, rule)
    return ValueError(f"{source.argument} must be {rule}, got {source.value!r}")
