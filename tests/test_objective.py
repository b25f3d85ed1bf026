"""The shared per-token objective: brute-force loops from the spec, and GRPO parity with Liger-Kernel."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from apo_kernels import AGG_MODES, APOConfig, apo_loss, apo_objective
from apo_kernels.objective import aggregation_weights


def brute_force_objective(
    logp, mask, adv, lam, old, ref, ent, cfg, num_tokens=None, norm_len=None, frozen=None, sampling=None
):
    """The spec's loss, one token at a time in Python floats. CISPO's clipped ratio and the off-policy mask are
    constants: taken at ``frozen`` (default ``logp``), so central differences that leave ``frozen`` alone give
    the gradient."""
    B, T = len(logp), len(logp[0])
    frozen = logp if frozen is None else frozen
    sampling = old if sampling is None else sampling

    def off_policy(b):
        """TRL's get_off_policy_mask: a negative advantage and a mean sampler KL (NaN: 0) above the threshold."""
        if cfg.off_policy_mask_threshold is None or adv[b] >= 0:
            return False
        valid = [t for t in range(T) if mask[b][t]]
        kl = [0.0 if math.isnan(sampling[b][t]) else sampling[b][t] - frozen[b][t] for t in valid]
        return sum(kl) / max(len(valid), 1) > cfg.off_policy_mask_threshold

    # TRL's entropy masking: the policy term only where a valid token's entropy reaches the (1 - q) quantile
    # (linear interpolation) of the valid tokens' entropies
    valid_entropies = sorted(ent[b][t] for b in range(B) for t in range(T) if mask[b][t])
    position = (1 - cfg.top_entropy_quantile) * (len(valid_entropies) - 1)
    below = int(position)
    threshold = (
        valid_entropies[below]
        + (position - below) * (valid_entropies[min(below + 1, len(valid_entropies) - 1)] - valid_entropies[below])
        if valid_entropies
        else 0
    )
    high_entropy = lambda b, t: cfg.top_entropy_quantile == 1 or ent[b][t] >= threshold
    kept = lambda b, t: high_entropy(b, t) and not off_policy(b)

    def ratio(lp, b, t):
        """The token's ratio, or with sequence-level ratios (GSPO, TRL's definition) its sequence's:
        exp of the mean log-ratio over the sequence's valid tokens."""
        if cfg.importance_sampling_level == "token":
            return math.exp(lp[b][t] - old[b][t])
        valid = [u for u in range(T) if mask[b][u]]
        return math.exp(sum(lp[b][u] - old[b][u] for u in valid) / max(len(valid), 1))

    def pg_of(b, t):
        if cfg.policy_loss == "dro":  # verl: -(A logp - beta / 2 (logp - old)^2)
            return -(adv[b] * logp[b][t] - 0.5 * cfg.dro_beta * (logp[b][t] - old[b][t]) ** 2)
        if cfg.policy_loss.startswith("dppo"):  # verl's DPPO-Binary, mask and weight at `frozen`
            p, p_old = math.exp(frozen[b][t]), math.exp(old[b][t])
            if cfg.policy_loss == "dppo_tv":
                within = p - p_old <= cfg.eps_high if adv[b] > 0 else p - p_old >= -cfg.eps_low
            else:
                kl = p_old * (old[b][t] - frozen[b][t]) + (1 - p_old) * math.log((1 - p_old + 1e-8) / (1 - p + 1e-8))
                within = (kl <= cfg.eps_high or p <= p_old) if adv[b] > 0 else (kl <= cfg.eps_low or p >= p_old)
            weight = math.exp(frozen[b][t] - old[b][t])
            weight = weight if cfg.clip_ratio_c is None else min(weight, cfg.clip_ratio_c)
            return -weight * within * adv[b] * logp[b][t]
        if cfg.policy_loss == "vespo":  # TRL: -phi(w) A logp, w from the sequence's summed log-ratios at `frozen`
            valid = [u for u in range(T) if mask[b][u]]
            log_w = sum(min(max(frozen[b][u] - old[b][u], -20.0), 20.0) for u in valid)
            log_w = min(max(log_w, math.log(1e-8)), 20.0)
            k, lam = (cfg.vespo_k_pos, cfg.vespo_lambda_pos) if adv[b] >= 0 else (cfg.vespo_k_neg, cfg.vespo_lambda_neg)
            return -math.exp(lam + k * log_w - lam * math.exp(log_w)) * adv[b] * logp[b][t]
        if cfg.policy_loss == "gmpo":  # verl's geo_mean: -A exp(mean of the log-ratios clipped on the side of A)
            sign = (adv[b] > 0) - (adv[b] < 0)
            log_ratios = [logp[b][u] - old[b][u] for u in range(T) if mask[b][u]]
            clipped = [sign * min(sign * x, sign * min(max(x, -cfg.eps_low), cfg.eps_high)) for x in log_ratios]
            return -adv[b] * math.exp(sum(clipped) / max(len(clipped), 1))
        if cfg.policy_loss == "cispo":  # TRL: clamp(rho, max=eps_high); verl: clamp(rho, 1 - low, 1 + high)
            weight = min(max(ratio(frozen, b, t), 1 - cfg.eps_low), 1 + cfg.eps_high)
            return -weight * adv[b] * logp[b][t]
        if cfg.policy_loss == "sapo":  # TRL and verl: -sigmoid(tau (rho - 1)) * 4 / tau * A
            tau = cfg.sapo_tau_pos if adv[b] > 0 else cfg.sapo_tau_neg
            rho = ratio(logp, b, t)
            return -4 / tau / (1 + math.exp(-tau * (rho - 1))) * adv[b]
        rho = ratio(logp, b, t)
        clipped = min(max(rho, 1 - cfg.eps_low), 1 + cfg.eps_high)
        capped = rho if cfg.ratio_cap is None else min(rho, cfg.ratio_cap)  # TRL's delta (two-sided clipping)
        pg = -min(capped * adv[b], clipped * adv[b])
        if cfg.clip_ratio_c is not None and adv[b] < 0:
            pg = min(pg, -adv[b] * cfg.clip_ratio_c)
        return pg

    def kl_of(b, t):
        d = ref[b][t] - logp[b][t]
        kl = {"k1": -d, "k2": d * d / 2, "k3": math.exp(d) - d - 1}[cfg.kl_estimator]
        return kl * ratio(logp, b, t) if cfg.kl_bias_correction else kl  # TRL: per_token_kl * coef_1

    def agg(x, mode):
        valid = [[t for t in range(T) if mask[b][t]] for b in range(B)]
        if mode == "token-mean":
            n = num_tokens if num_tokens is not None else max(sum(map(len, valid)), 1)
            return sum(x(b, t) for b in range(B) for t in valid[b]) / n
        if mode == "seq-mean-token-mean":
            return sum(sum(x(b, t) for t in valid[b]) / max(len(valid[b]), 1) for b in range(B)) / B
        total = sum(x(b, t) for b in range(B) for t in valid[b]) / B
        return total if mode == "seq-mean-token-sum" else total / (norm_len or T)

    loss = agg(lambda b, t: pg_of(b, t) * kept(b, t), cfg.loss_agg_mode) + cfg.beta * agg(
        lambda b, t: lam[b] * kl_of(b, t), cfg.kl_agg_mode
    )
    if cfg.entropy_token_mean:  # TRL's bonus: the mean entropy of the tokens the policy term trains on
        bonus = [ent[b][t] for b in range(B) for t in range(T) if mask[b][t] and high_entropy(b, t)]
        return loss - cfg.entropy_coef * sum(bonus) / max(len(bonus), 1)
    return loss - cfg.entropy_coef * agg(lambda b, t: ent[b][t], cfg.loss_agg_mode)


@st.composite
def objective_cases(draw):
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    policy_loss = draw(st.sampled_from(["ppo", "cispo", "sapo", "vespo", "dro", "dppo_tv", "dppo_kl", "gmpo"]))
    level = draw(st.sampled_from(["token"] + ["sequence"] * (policy_loss in ("ppo", "cispo", "sapo"))))
    cfg = APOConfig(
        kl_bias_correction=draw(st.booleans()) if policy_loss not in ("vespo", "gmpo") else False,
        dro_beta=draw(st.sampled_from([0.3, 2.0])) if policy_loss == "dro" else None,
        vespo_k_pos=draw(st.sampled_from([2.0, 0.5])),
        vespo_lambda_neg=draw(st.sampled_from([2.0, 4.0])),
        sapo_tau_pos=draw(st.sampled_from([1.0, 2.0])),
        sapo_tau_neg=draw(st.sampled_from([1.05, 0.5])),
        beta=draw(st.sampled_from([0.0, 1e-3, 0.5])),
        kl_estimator=draw(st.sampled_from(["k1", "k2", "k3"])),
        policy_loss=policy_loss,
        importance_sampling_level=level,
        eps_low=draw(st.sampled_from([0.2, 0.1] + [1.0] * (policy_loss == "cispo"))),
        eps_high=draw(st.sampled_from([0.2, 0.28])),
        clip_ratio_c=draw(st.sampled_from([None, 3.0])) if policy_loss in ("ppo", "dppo_tv", "dppo_kl") else None,
        ratio_cap=draw(st.sampled_from([None, 1.5])) if policy_loss == "ppo" else None,
        loss_agg_mode=draw(st.sampled_from(AGG_MODES)),
        kl_agg_mode=draw(st.sampled_from(AGG_MODES)),
        loss_agg_norm=draw(st.sampled_from([None, 9])),
        entropy_coef=draw(st.sampled_from([0.0, 0.01])),
        entropy_token_mean=draw(st.booleans()),
        top_entropy_quantile=draw(st.sampled_from([1.0] + [0.5, 0.2] * (policy_loss not in ("dro", "gmpo")))),
        off_policy_mask_threshold=draw(
            st.sampled_from([None, None] + [0.0, 0.1] * (policy_loss not in ("dro", "gmpo")))
        ),
    )
    return B, T, seed, cfg, draw(st.sampled_from([None, 17.0]))


@settings(max_examples=200)
@given(objective_cases())
def test_apo_objective_matches_brute_force(case):
    B, T, seed, cfg, num_tokens = case
    gen = torch.Generator().manual_seed(seed)
    logp = (-3 * torch.rand(B, T, generator=gen, dtype=torch.float64)).requires_grad_()
    old = (logp.detach() + 0.5 * torch.randn(B, T, generator=gen, dtype=torch.float64)).clamp(max=-1e-3)  # log-probs
    ref = logp.detach() + torch.randn(B, T, generator=gen, dtype=torch.float64)
    ent = torch.rand(B, T, generator=gen, dtype=torch.float64).requires_grad_()
    mask = torch.rand(B, T, generator=gen) > 0.3
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    lam = torch.rand(B, generator=gen, dtype=torch.float64)
    # the sampler's log-probs, off the old ones by up to 0.4, one of them unscorable (NaN, as vLLM's)
    sampling = old + 0.4 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    sampling[0, 0] = math.nan
    if cfg.loss_agg_mode != "token-mean" and cfg.kl_agg_mode != "token-mean":
        num_tokens = None
    loss, metrics = apo_objective(
        logp,
        mask,
        adv,
        entropy=ent,
        kl_weights=lam,
        old_logps=old,
        ref_logps=ref,
        sampling_logps=sampling,
        config=cfg,
        num_tokens=num_tokens,
    )
    to_list = lambda x: x.detach().tolist()
    expected = brute_force_objective(
        to_list(logp),
        to_list(mask),
        to_list(adv),
        to_list(lam),
        to_list(old),
        to_list(ref),
        to_list(ent),
        cfg,
        num_tokens=num_tokens,
        norm_len=cfg.loss_agg_norm,
        sampling=to_list(sampling),
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-14)
    # gradients: central differences of the brute force on two coordinates
    g_logp, g_ent = torch.autograd.grad(loss, (logp, ent), allow_unused=True)
    b, t = B - 1, T - 1
    h = 1e-6
    for grad, tensor_list in ((g_logp, "logp"), (g_ent, "ent")):
        args = {k: to_list(v) for k, v in dict(logp=logp, ent=ent).items()}
        plus, minus = [row[:] for row in args[tensor_list]], [row[:] for row in args[tensor_list]]
        plus[b][t] += h
        minus[b][t] -= h
        f = lambda x: brute_force_objective(
            x if tensor_list == "logp" else args["logp"],
            to_list(mask),
            to_list(adv),
            to_list(lam),
            to_list(old),
            to_list(ref),
            x if tensor_list == "ent" else args["ent"],
            cfg,
            num_tokens=num_tokens,
            norm_len=cfg.loss_agg_norm,
            frozen=args["logp"],
            sampling=to_list(sampling),
        )
        numeric = (f(plus) - f(minus)) / (2 * h)
        analytic = 0.0 if grad is None else grad[b, t].item()
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8)
    assert set(metrics) >= {
        "pg_loss",
        "kl",
        "entropy",
        "clip_frac_low",
        "clip_frac_high",
        "ratio_mean",
        "kl_weight_mean",
    }


def test_metrics_are_token_means_over_valid_tokens():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    old = logp - torch.tensor([[0.5, 0.0, -0.5], [0.0, 0.0, 0.0]])  # ratios e^.5, 1, e^-.5
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([1.0, -1.0])
    _, m = apo_objective(logp, mask, adv, old_logps=old, ref_logps=logp, kl_weights=torch.tensor([0.5, 1.0]))
    assert m["ratio_mean"].item() == pytest.approx((math.exp(0.5) + 1 + math.exp(-0.5) + 1) / 4, rel=1e-6)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 4)  # e^.5 > 1.2 with A > 0
    assert m["clip_frac_low"].item() == 0.0  # e^-.5 < 0.8 but A > 0 there
    assert m["kl"].item() == 0.0
    assert m["kl_weight_mean"].item() == pytest.approx((3 * 0.5 + 1.0) / 4)


def test_sequence_level_clip_fractions_count_sequences():
    logp = torch.zeros(3, 3)
    old = -torch.tensor([[0.2, 0.4, 0.6], [0.0, 5.0, 5.0], [9.0, 9.0, 9.0]])  # sequence ratios e^.4, 1, (empty)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    adv = torch.tensor([1.0, -1.0, 1.0])
    cfg = APOConfig(importance_sampling_level="sequence", beta=0.0)
    _, m = apo_objective(logp, mask, adv, old_logps=old, config=cfg)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 2)  # one of the two sequences with tokens, not 3/4 tokens
    assert m["clip_frac_low"].item() == 0.0
    assert m["ratio_mean"].item() == pytest.approx((3 * math.exp(0.4) + 1) / 4, rel=1e-6)  # a token mean


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_padding_values_at_masked_positions_do_not_leak(level):
    logp = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    garbage = torch.tensor(float("nan"), dtype=torch.float64)
    old = torch.where(mask.bool(), logp.detach() + 0.1, garbage)
    ref = torch.where(mask.bool(), logp.detach() - 0.1, -torch.inf)
    clean_old = torch.where(mask.bool(), old, 0.0)
    clean_ref = torch.where(mask.bool(), ref, 0.0)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    cfg = APOConfig(importance_sampling_level=level)
    loss, _ = apo_objective(logp, mask, adv, old_logps=old, ref_logps=ref, config=cfg)
    clean, _ = apo_objective(logp, mask, adv, old_logps=clean_old, ref_logps=clean_ref, config=cfg)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(clean.item())
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.all(g[~mask.bool()] == 0)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_fully_masked_sequences_count_as_sequences(mode):
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    w = aggregation_weights(mask, mode)
    x = torch.tensor([[2.0, 4.0], [100.0, 100.0]])
    expected = {
        "token-mean": 3.0,
        "seq-mean-token-mean": 1.5,
        "seq-mean-token-sum": 3.0,
        "seq-mean-token-sum-norm": 1.5,
    }
    assert (w * x).sum().item() == pytest.approx(expected[mode])


# --- GRPO parity: with DADS and STCR off, apo_loss is Liger-Kernel's fused GRPO loss ------------------

LIGER_LOSS_TYPES = {"bnpo": "token-mean", "grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm"}


@pytest.mark.parametrize("loss_type", sorted(LIGER_LOSS_TYPES))
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_special_case_matches_liger(loss_type, beta):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    B, T, D, V = 3, 7, 16, 53
    gen = torch.Generator().manual_seed(hash((loss_type, beta)) % 2**31)
    hidden = torch.randn(B, T, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) / 4
    targets = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    adv = torch.randn(B, generator=gen)
    with torch.no_grad():
        logits = hidden @ weight.T
        cur = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    old = cur + 0.3 * torch.randn(B, T, generator=gen)
    ref = cur + 0.5 * torch.randn(B, T, generator=gen)

    liger = LigerFusedLinearGRPOLoss(
        beta=beta, compiled=False, loss_type=loss_type, max_completion_length=T, use_ref_model=beta > 0
    )
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    liger_loss, _ = liger(h1, w1, targets, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
    liger_loss.backward()

    mode = LIGER_LOSS_TYPES[loss_type]
    cfg = APOConfig(beta=beta, loss_agg_mode=mode, kl_agg_mode=mode, dads=False, stcr=False)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = apo_loss(h2, w2, targets, mask, adv, old_logps=old, ref_logps=ref if beta else None, config=cfg)
    ours.loss.backward()

    torch.testing.assert_close(ours.loss, liger_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-4, atol=1e-6)


def test_objective_compiles_with_fullgraph():
    gen = torch.Generator().manual_seed(0)
    logp = (-torch.rand(3, 5, generator=gen)).requires_grad_()
    mask = torch.rand(3, 5, generator=gen) > 0.3
    adv, lam = torch.randn(3, generator=gen), torch.rand(3, generator=gen)
    old, ref = logp.detach() + 0.1, logp.detach() - 0.2

    def loss_fn(lp):
        return apo_objective(lp, mask, adv, kl_weights=lam, old_logps=old, ref_logps=ref)[0]

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    eager = loss_fn(logp)
    (g_eager,) = torch.autograd.grad(eager, logp)
    out = compiled(logp)
    (g_compiled,) = torch.autograd.grad(out, logp)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g_compiled, g_eager)


def _thresholds_on_rank(rank, world_size):
    """Each rank's entropies (different shapes and masks): the threshold over the group, and over its own."""
    from apo_kernels.objective import entropy_threshold

    gen = torch.Generator().manual_seed(rank)
    entropy = torch.rand(2 + rank, 3 + 2 * rank, generator=gen, dtype=torch.float64)
    valid = torch.rand(entropy.shape, generator=gen) > 0.3
    return (
        entropy[valid],
        entropy_threshold(entropy, valid, 0.3, torch.distributed.group.WORLD),
        entropy_threshold(entropy, valid, 0.3),
    )


def test_entropy_threshold_is_taken_over_every_rank():
    from tests.distributed import run_ranks

    results = run_ranks(_thresholds_on_rank, 3)
    everyone = torch.quantile(torch.cat([valid for valid, _, _ in results]), 0.3)
    for valid, over_group, own in results:
        assert over_group.item() == everyone.item()
        assert own.item() == torch.quantile(valid, 0.3).item()
    assert len({own.item() for _, _, own in results}) == 3, "the ranks' own thresholds should differ"


def test_entropy_masking_keeps_the_policy_term_on_high_entropy_tokens_only():
    """Tokens below the threshold get no policy gradient but keep their KL gradient; clip metrics ignore the mask."""
    logp = torch.tensor([[-1.0, -2.0, -3.0, -1.5]], dtype=torch.float64, requires_grad=True)
    entropy = torch.tensor([[0.1, 2.0, 0.5, 3.0]], dtype=torch.float64)
    old = logp.detach() - 0.5  # every ratio e^0.5: clipped high with A > 0
    cfg = APOConfig(beta=0.0, top_entropy_quantile=0.5, eps_high=1.0)  # threshold 1.25: tokens 1 and 3 kept
    loss, metrics = apo_objective(
        logp, torch.ones(1, 4), torch.tensor([1.0], dtype=torch.float64), entropy=entropy, old_logps=old, config=cfg
    )
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[0, 0] == 0 and grad[0, 2] == 0
    assert grad[0, 1] == grad[0, 3] == pytest.approx(-math.exp(0.5) / 4)
    with pytest.raises(ValueError, match="needs the entropies"):
        apo_objective(logp, torch.ones(1, 4), torch.tensor([1.0]), old_logps=old, config=cfg)
