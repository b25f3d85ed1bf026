"""APO configuration: one frozen dataclass, validated at construction.

Defaults reproduce the released View-R1 recipe (arXiv 2506.21655, its OpenRLHF fork); every constant the
released code hard-codes is a field here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

#: Aggregation modes, named as verl names them (see ``objective.aggregation_weights``).
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
#: KL estimators of KL(pi || pi_ref) from ``delta = ref_logp - logp`` (Schulman's k1, k2, k3).
KL_ESTIMATORS = ("k1", "k2", "k3")
#: ``accuracy``: the released ``f(d) = 1 - exp(-s (1 - d))``; ``difficulty``: the unused ``exp(-s d)``.
DADS_VARIANTS = ("accuracy", "difficulty")
#: What makes a response *positive* for DADS: its advantage after STCR (released) or its correctness.
POSITIVE_BY = ("advantage", "correct")
#: Whose reward std divides the advantages: each group's (GRPO, released) or the whole rollout batch's.
REWARD_STDS = ("group", "batch")
#: The policy term: PPO's clipped surrogate (released), CISPO's clipped and detached importance weight,
#: SAPO's soft (sigmoid) gate on the ratio, VESPO's detached gamma weight of the sequence's ratio, DRO's
#: quadratic log-ratio penalty, DPPO's divergence-masked truncated weight (total variation or binary KL), or GMPO's
#: geometric mean of clipped token ratios.
POLICY_LOSSES = ("ppo", "cispo", "sapo", "vespo", "dro", "dppo_tv", "dppo_kl", "gmpo")
#: Policy terms whose sequence ratio is their own (not ``importance_sampling_level``'s).
OWN_SEQUENCE_RATIO_LOSSES = ("vespo", "gmpo")
#: Policy terms that read ``clip_ratio_c``: PPO's dual clip, DPPO's truncation of the importance weight.
CAPPED_POLICY_LOSSES = ("ppo", "dppo_tv", "dppo_kl")
#: The importance ratio of each token: its own (PPO, released) or its sequence's (GSPO), as TRL names them.
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def _require(ok: bool, field: str, expected: str, value) -> None:
    if not ok:
        raise ValueError(f"APOConfig.{field} must be {expected}, got {value!r}")


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class APOConfig:
    """Hyperparameters of the APO objective (group stage and loss stage).

    Attributes:
        beta: KL-loss coefficient (released: 1e-3). 0 disables the KL term and ``ref_logps``.
        kl_estimator: ``"k1"`` (``logp - ref``), ``"k2"`` (``delta**2 / 2``) or ``"k3"``
            (``exp(delta) - delta - 1``, released, unclamped), with ``delta = ref_logp - logp``.
        policy_loss: ``"ppo"`` (released): ``-min(rho A, clip(rho) A)``; ``"cispo"`` (MiniMax-M1, as TRL's
            and verl's ``cispo``): ``-sg(clip(rho)) A logp``, every token keeps a gradient, its importance
            weight clipped and detached; ``"sapo"`` (as TRL's and verl's ``sapo``): ``-g(rho) A`` with the
            soft gate ``g(rho) = sigmoid(tau (rho - 1)) * 4 / tau``, ``tau = sapo_tau_pos`` where ``A > 0``,
            else ``sapo_tau_neg`` (no clip range); ``"vespo"`` (as TRL's ``vespo``): ``-sg(phi(w)) A logp`` with
            the sequence's ratio ``w = exp(clamp(sum over its tokens of clamp(logp - old_logp, +-20),
            log 1e-8, 20))`` and the gamma weight ``phi(w) = exp(lam + k log w - lam w)`` (``w^k e^(lam (1 - w))``,
            0 where not finite), ``k, lam = vespo_k_pos, vespo_lambda_pos`` where ``A >= 0``, else the ``_neg``
            pair (no clip range; token-level ``importance_sampling_level``, the sequence is VESPO's own);
            ``"dro"`` (verl's ``dro``): ``-(A logp - dro_beta / 2 (logp - old_logp)^2)``; ``"dppo_tv"`` and
            ``"dppo_kl"`` (verl's, DPPO-Binary): ``-sg(min(rho, clip_ratio_c)) A logp`` on the tokens whose
            divergence from the old policy stays within ``eps_high`` (``A > 0``) or ``eps_low`` (else): the
            probability difference ``p - p_old`` (TV), or the binary KL ``p_old log(p_old / p) + (1 - p_old)
            log((1 - p_old) / (1 - p))`` unless ``p`` moved against ``A`` (KL); here ``eps_low``/``eps_high``
            are those thresholds, not a ratio range; ``"gmpo"`` (verl's ``geo_mean``, GMPO): ``-A R`` with the
            sequence's ratio ``R = exp(mean over its valid tokens of c_t)``, ``c_t`` the token's log-ratio
            ``x = logp - old_logp`` clipped on its advantage's side, ``sgn(A) min(sgn(A) x, sgn(A) clamp(x,
            -eps_low, eps_high))`` (0 where ``A = 0``), so ``eps_low``/``eps_high`` bound log-ratios; a token's
            gradient is 0 where its own clip acts (token ``importance_sampling_level``: the sequence is GMPO's own).
        importance_sampling_level: ``"token"`` (released): ``rho = pi / pi_old`` per token; ``"sequence"``
            (GSPO, TRL's ``importance_sampling_level="sequence"``, verl's ``gspo``): every token of a response
            takes the response's ratio ``s = exp(mean over its tokens of (logp - old_logp))`` in the policy
            term, whichever ``policy_loss``. The gradient is GSPO-token's (``s`` times each token's own
            ``grad logp``), which is GSPO's exactly when advantages are constant within a response.
        sapo_tau_pos, sapo_tau_neg: SAPO's gate temperatures (TRL's and verl's defaults: 1.0 and 1.05).
        kl_bias_correction: each token's KL times its importance ratio, differentiable: the unbiased reverse-KL
            gradient (DeepSeek-V3.2; TRL's ``use_bias_correction_kl``, on by default there). False (released): the
            KL as estimated. With ``importance_sampling_level="sequence"`` the ratio is the sequence's,
            differentiated through every token of it (TRL's broadcast). Not with ``policy_loss`` ``"vespo"`` or
            ``"gmpo"`` and ``beta > 0`` (TRL weights by the token ratio, which their sequence ratios replace here).
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's gamma weight's shape and rate
            (TRL's defaults: 2, 3, 3, 2); each ``lambda`` must be > 0.
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]`` of the ratio (eps_high > eps_low is
            DAPO's clip-higher; ``eps_low = 1`` leaves the ratio unclipped below, as TRL's CISPO, whose
            ``epsilon_high`` is the upper bound itself: ``eps_high = epsilon_high - 1``, which may be negative);
            ``eps_low = 1`` with ``eps_high = math.inf`` leaves PPO's ratio unclipped (verl's ``kl_cov``).
        ratio_cap: INTELLECT-2's two-sided clip (TRL's ``delta``; ``"ppo"`` only): the unclipped branch uses
            ``min(rho, ratio_cap)``, so a large ratio with a negative advantage stops pulling. ``None``
            (released) disables it; it must be > 1.
        clip_ratio_c: verl's dual clip (``"ppo"``): for negative advantages the policy term is capped at
            ``-clip_ratio_c * A``; with DPPO, the importance weight's truncation. ``None`` (released) disables
            it; it must be > 1.
        dro_beta: DRO's penalty coefficient (``"dro"`` only, where it must be > 0; verl's ``dro_beta``).
        temperature: logits are divided by it before the softmax (match the sampler's).
        loss_agg_mode: aggregation of the policy (and entropy) term; released ``"token-mean"``.
        kl_agg_mode: aggregation of the KL term; released ``"seq-mean-token-mean"``.
        loss_agg_norm: ``T_norm`` of ``"seq-mean-token-sum-norm"`` (Dr.GRPO's max completion length);
            ``None`` uses the padded sequence length ``T``.
        dads: scale the KL weight of positive responses by difficulty (Difficulty-Adaptive Divergence
            Shaping).
        dads_variant: ``"accuracy"`` (released ``1 - exp(-s (1 - d))``) or ``"difficulty"`` (``exp(-s d)``).
        dads_scale: ``s`` above; released ``e``.
        stcr: amplify the negative advantage of wrong answers longer than the group's mean correct
            answer (Suboptimal Trajectory Complexity Regularization).
        stcr_base: ``w = 1 - stcr_base ** -(L - Lbar)``; released 1.00001. Must be > 1.
        off_policy_mask_threshold: DeepSeek-V3.2's off-policy sequence mask (TRL's ``off_policy_mask_threshold``):
            the policy term drops the tokens of negative advantage in a sequence whose mean ``sampling_logp -
            logp`` (the sampler's forward KL estimate, over its valid tokens; unscorable NaN sampling log-probs
            count 0) exceeds it. None (released): no mask. It needs whole sequences, so one-pass chunks end at
            sequence ends (as with sequence ratios). Not with ``policy_loss="dro"`` (whose penalty does not
            scale with the advantage).
        positive_by: ``"advantage"`` (released: ``A > 0`` after STCR) or ``"correct"``.
        adv_eps: added to the group reward std, > 0 (released 1e-9; TRL uses 1e-4, verl 1e-6).
        scale_rewards: divide advantages by the reward std (``False``: Dr.GRPO).
        reward_std: that std: ``"group"`` (released: each group's) or ``"batch"`` (the whole rollout batch's,
            TRL's ``scale_rewards="batch"``); the baseline stays the group mean.
        entropy_coef: entropy bonus ``- entropy_coef * agg(H)``; 0 (released) skips the entropy.
        entropy_token_mean: the bonus's ``agg``: the mean entropy of the tokens the policy term trains on in this
            call (the valid tokens, the high-entropy ones with ``top_entropy_quantile < 1``), whatever
            ``loss_agg_mode`` and the global normalizers (TRL's); False (released): the policy term's aggregation of
            every valid token's entropy (verl's).
        top_entropy_quantile: the policy term trains only on the tokens whose entropy is at least the
            ``1 - top_entropy_quantile`` quantile of the valid tokens' entropies ("Beyond the 80/20 rule",
            TRL's ``top_entropy_quantile``); the KL term and the entropy bonus keep every token. 1 (released)
            keeps all. The quantile needs every token's entropy before any gradient: two passes.
    """

    beta: float = 1e-3
    kl_estimator: str = "k3"
    policy_loss: str = "ppo"
    importance_sampling_level: str = "token"
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    kl_bias_correction: bool = False
    off_policy_mask_threshold: Optional[float] = None
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    ratio_cap: Optional[float] = None
    clip_ratio_c: Optional[float] = None
    dro_beta: Optional[float] = None
    temperature: float = 1.0
    loss_agg_mode: str = "token-mean"
    kl_agg_mode: str = "seq-mean-token-mean"
    loss_agg_norm: Optional[int] = None
    dads: bool = True
    dads_variant: str = "accuracy"
    dads_scale: float = math.e
    stcr: bool = True
    stcr_base: float = 1.00001
    positive_by: str = "advantage"
    adv_eps: float = 1e-9
    scale_rewards: bool = True
    reward_std: str = "group"
    entropy_coef: float = 0.0
    entropy_token_mean: bool = False
    top_entropy_quantile: float = 1.0

    @property
    def sequence_ratio(self) -> bool:
        """Whether a token's policy term reads its whole sequence's log-ratios (GSPO's, VESPO's and GMPO's ratios)."""
        return self.importance_sampling_level == "sequence" or self.policy_loss in OWN_SEQUENCE_RATIO_LOSSES

    @property
    def whole_sequences(self) -> bool:
        """Whether a token's terms read its whole sequence's log-probs (sequence ratios, the off-policy mask):
        one-pass chunks then end at sequence ends."""
        return self.sequence_ratio or self.off_policy_mask_threshold is not None

    def __post_init__(self) -> None:
        _require(_is_real(self.beta) and self.beta >= 0, "beta", "a finite float >= 0", self.beta)
        _require(self.kl_estimator in KL_ESTIMATORS, "kl_estimator", f"one of {KL_ESTIMATORS}", self.kl_estimator)
        _require(self.policy_loss in POLICY_LOSSES, "policy_loss", f"one of {POLICY_LOSSES}", self.policy_loss)
        _require(
            self.importance_sampling_level in IMPORTANCE_SAMPLING_LEVELS,
            "importance_sampling_level",
            f"one of {IMPORTANCE_SAMPLING_LEVELS}",
            self.importance_sampling_level,
        )
        for name in ("sapo_tau_pos", "sapo_tau_neg", "vespo_lambda_pos", "vespo_lambda_neg"):
            value = getattr(self, name)
            _require(_is_real(value) and value > 0, name, "a finite float > 0", value)
        for name in ("vespo_k_pos", "vespo_k_neg"):
            _require(_is_real(getattr(self, name)), name, "a finite float", getattr(self, name))
        _require(
            self.policy_loss in ("ppo", "cispo", "sapo") or self.importance_sampling_level == "token",
            "importance_sampling_level",
            f"'token' with policy_loss={self.policy_loss!r} (sequence ratios serve "
            "the 'ppo', 'cispo' and 'sapo' terms; VESPO's and GMPO's sequence ratios are their own)",
            self.importance_sampling_level,
        )
        _require(
            not (self.kl_bias_correction and self.policy_loss in OWN_SEQUENCE_RATIO_LOSSES and self.beta > 0),
            "kl_bias_correction",
            f"False with policy_loss={self.policy_loss!r} and beta > 0 (TRL weights the KL by the token ratio, "
            "which this term's sequence ratio replaces)",
            self.kl_bias_correction,
        )
        _require(
            self.off_policy_mask_threshold is None or _is_real(self.off_policy_mask_threshold),
            "off_policy_mask_threshold",
            "None or a finite float",
            self.off_policy_mask_threshold,
        )
        _require(
            self.policy_loss != "dro" or self.off_policy_mask_threshold is None,
            "off_policy_mask_threshold",
            "None with policy_loss='dro' (masking its advantages would keep its penalty)",
            self.off_policy_mask_threshold,
        )
        for name, neutral in (("off_policy_mask_threshold", None), ("top_entropy_quantile", 1)):
            _require(
                self.policy_loss != "gmpo" or getattr(self, name) == neutral,
                name,
                f"{neutral!r} with policy_loss='gmpo' (a masked advantage would change its sequence ratio's clips)",
                getattr(self, name),
            )
        _require(
            self.policy_loss != "dro" or self.top_entropy_quantile == 1,
            "top_entropy_quantile",
            "1 with policy_loss='dro' (masking its advantages would keep its penalty)",
            self.top_entropy_quantile,
        )
        _require(_is_real(self.eps_low) and 0 <= self.eps_low <= 1, "eps_low", "a float in [0, 1]", self.eps_low)
        _require(
            self.ratio_cap is None or (_is_real(self.ratio_cap) and self.ratio_cap > 1),
            "ratio_cap",
            "None or a finite float > 1",
            self.ratio_cap,
        )
        _require(
            self.ratio_cap is None or self.policy_loss == "ppo",
            "ratio_cap",
            f"None with policy_loss={self.policy_loss!r} (it caps PPO's unclipped branch)",
            self.ratio_cap,
        )
        _require(
            self.clip_ratio_c is None or self.policy_loss in CAPPED_POLICY_LOSSES,
            "clip_ratio_c",
            f"None with policy_loss={self.policy_loss!r} (it caps PPO's surrogate or DPPO's weight)",
            self.clip_ratio_c,
        )
        _require(
            _is_real(self.dro_beta) and self.dro_beta > 0 if self.policy_loss == "dro" else self.dro_beta is None,
            "dro_beta",
            "a finite float > 0 with policy_loss='dro' (else None)",
            self.dro_beta,
        )
        if self.policy_loss == "cispo":  # only bounds a weight: TRL's default upper bound is below 1
            _require(
                _is_real(self.eps_high) and self.eps_high > -1,
                "eps_high",
                "a finite float > -1 with policy_loss='cispo' (upper bound 1 + eps_high > 0)",
                self.eps_high,
            )
        else:
            _require(
                (_is_real(self.eps_high) or self.eps_high == math.inf) and self.eps_high >= 0,
                "eps_high",
                "a float >= 0 (math.inf: no upper clip)",
                self.eps_high,
            )
        _require(
            self.clip_ratio_c is None or (_is_real(self.clip_ratio_c) and self.clip_ratio_c > 1),
            "clip_ratio_c",
            "None or a finite float > 1",
            self.clip_ratio_c,
        )
        _require(
            _is_real(self.temperature) and self.temperature > 0, "temperature", "a finite float > 0", self.temperature
        )
        _require(self.loss_agg_mode in AGG_MODES, "loss_agg_mode", f"one of {AGG_MODES}", self.loss_agg_mode)
        _require(self.kl_agg_mode in AGG_MODES, "kl_agg_mode", f"one of {AGG_MODES}", self.kl_agg_mode)
        _require(
            self.loss_agg_norm is None
            or (
                isinstance(self.loss_agg_norm, int)
                and not isinstance(self.loss_agg_norm, bool)
                and self.loss_agg_norm > 0
            ),
            "loss_agg_norm",
            "None or an int > 0",
            self.loss_agg_norm,
        )
        _require(isinstance(self.dads, bool), "dads", "a bool", self.dads)
        _require(self.dads_variant in DADS_VARIANTS, "dads_variant", f"one of {DADS_VARIANTS}", self.dads_variant)
        _require(_is_real(self.dads_scale) and self.dads_scale > 0, "dads_scale", "a finite float > 0", self.dads_scale)
        _require(isinstance(self.stcr, bool), "stcr", "a bool", self.stcr)
        _require(_is_real(self.stcr_base) and self.stcr_base > 1, "stcr_base", "a finite float > 1", self.stcr_base)
        _require(self.positive_by in POSITIVE_BY, "positive_by", f"one of {POSITIVE_BY}", self.positive_by)
        # 0 would divide a group of equal rewards' 0 spread into NaN (or their rounding into +-1)
        _require(_is_real(self.adv_eps) and self.adv_eps > 0, "adv_eps", "a finite float > 0", self.adv_eps)
        _require(isinstance(self.scale_rewards, bool), "scale_rewards", "a bool", self.scale_rewards)
        _require(self.reward_std in REWARD_STDS, "reward_std", f"one of {REWARD_STDS}", self.reward_std)
        _require(_is_real(self.entropy_coef), "entropy_coef", "a finite float", self.entropy_coef)
        _require(isinstance(self.entropy_token_mean, bool), "entropy_token_mean", "a bool", self.entropy_token_mean)
        _require(
            _is_real(self.top_entropy_quantile) and 0 < self.top_entropy_quantile <= 1,
            "top_entropy_quantile",
            "a float in (0, 1]",
            self.top_entropy_quantile,
        )
