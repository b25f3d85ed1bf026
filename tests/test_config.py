import dataclasses
import math

import pytest

from apo_kernels import AGG_MODES, APOConfig


def test_defaults_are_the_released_view_r1_recipe():
    cfg = APOConfig()
    assert (cfg.beta, cfg.kl_estimator, cfg.eps_low, cfg.eps_high, cfg.clip_ratio_c) == (1e-3, "k3", 0.2, 0.2, None)
    assert (cfg.loss_agg_mode, cfg.kl_agg_mode) == ("token-mean", "seq-mean-token-mean")
    assert (cfg.dads, cfg.dads_variant, cfg.dads_scale) == (True, "accuracy", math.e)
    assert (cfg.stcr, cfg.stcr_base, cfg.positive_by) == (True, 1.00001, "advantage")
    assert (cfg.adv_eps, cfg.scale_rewards, cfg.entropy_coef, cfg.temperature) == (1e-9, True, 0.0, 1.0)


def test_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        APOConfig().beta = 0.1


@pytest.mark.parametrize("mode", AGG_MODES)
def test_accepts_every_verl_aggregation_name(mode):
    assert APOConfig(loss_agg_mode=mode, kl_agg_mode=mode).kl_agg_mode == mode


@pytest.mark.parametrize(
    "field, value",
    [
        ("beta", -0.1),
        ("beta", float("nan")),
        ("beta", "0.1"),
        ("kl_estimator", "low_var_kl"),
        ("eps_low", 1.1),
        ("eps_low", -0.1),
        ("policy_loss", "gspo"),
        ("sapo_tau_neg", 0.0),
        ("eps_high", -0.2),
        ("clip_ratio_c", 1.0),
        ("ratio_cap", 1.0),
        ("clip_ratio_c", float("inf")),
        ("temperature", 0.0),
        ("temperature", float("inf")),
        ("loss_agg_mode", "token-sum"),
        ("kl_agg_mode", "mean"),
        ("loss_agg_norm", 0),
        ("loss_agg_norm", 2.5),
        ("dads", 1),
        ("dads_variant", "exp"),
        ("dads_scale", 0.0),
        ("stcr", "yes"),
        ("stcr_base", 1.0),
        ("positive_by", "reward"),
        ("adv_eps", -1e-9),
        ("adv_eps", 0.0),  # a group of equal rewards would get NaN advantages
        ("scale_rewards", None),
        ("reward_std", "global"),
        ("entropy_coef", float("nan")),
        ("importance_sampling_level", "group"),
        ("top_entropy_quantile", 0.0),
        ("top_entropy_quantile", 1.5),
        ("vespo_lambda_pos", 0.0),
        ("vespo_k_neg", float("inf")),
        ("dro_beta", 0.5),  # only with policy_loss="dro"
    ],
)
def test_invalid_field_raises_naming_it(field, value):
    with pytest.raises(ValueError, match=rf"APOConfig\.{field} must be"):
        APOConfig(**{field: value})


def test_dual_clip_is_refused_with_cispo():
    with pytest.raises(ValueError, match=r"APOConfig\.clip_ratio_c must be None with policy_loss='cispo'"):
        APOConfig(policy_loss="cispo", clip_ratio_c=3.0)


def test_vespo_dro_and_dppo_keep_token_level_ratios():
    for policy_loss in ("vespo", "dro", "dppo_tv", "dppo_kl"):
        with pytest.raises(
            ValueError, match=rf"APOConfig\.importance_sampling_level must be 'token' with policy_loss='{policy_loss}'"
        ):
            APOConfig(
                policy_loss=policy_loss,
                importance_sampling_level="sequence",
                dro_beta=1.0 if policy_loss == "dro" else None,
            )
    assert (
        APOConfig(policy_loss="vespo").sequence_ratio and APOConfig(importance_sampling_level="sequence").sequence_ratio
    )
    assert not APOConfig().sequence_ratio


def test_dro_needs_its_beta_and_no_entropy_masking():
    with pytest.raises(ValueError, match=r"APOConfig\.dro_beta must be a finite float > 0 with policy_loss='dro'"):
        APOConfig(policy_loss="dro")
    with pytest.raises(ValueError, match=r"APOConfig\.top_entropy_quantile must be 1 with policy_loss='dro'"):
        APOConfig(policy_loss="dro", dro_beta=0.5, top_entropy_quantile=0.5)
    assert APOConfig(policy_loss="dppo_kl", clip_ratio_c=5.0).clip_ratio_c == 5.0  # DPPO's truncation
