"""The APO epilogue in one elementwise kernel: each token's loss contribution and its derivatives.

The second copy of the per-token formula of ``apo_kernels.objective`` (``policy_term``, ``kl_penalty``,
``torch_epilogue``); ``tests/kernels/test_apo_epilogue.py`` pins the two together. The kernel writes
the weighted per-token loss, ``dL/dlogp`` and ``dL/dH`` in the same pass, so the backward is a scale.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor

from ..config import APOConfig
from ..objective import EpilogueOutput
from .launch import eager_or_op, on_device_of

BLOCK = 512  # tokens of one sequence per program; a 2-D grid (sequence, block) needs no index division
KL_ESTIMATOR_IDS = {"k1": 0, "k2": 1, "k3": 2}
DPPO_IDS = {"dppo_tv": 1, "dppo_kl": 2}  # the DPPO constexpr; 0: not DPPO


@triton.jit
def _load_bt(ptr, stride_b, stride_t, b, t, ok):
    """Element ``[b, t]`` of a ``(B, T)`` view (possibly strided or expanded)."""
    return tl.load(ptr + b * stride_b + t * stride_t, mask=ok, other=0.0)


@triton.jit
def _apo_epilogue_kernel(
    logp_ptr, logp_sb, logp_st, ent_ptr, ent_sb, ent_st, old_ptr, old_sb, old_st, ref_ptr, ref_sb, ref_st,
    adv_ptr, adv_sb, adv_st, w_pg_ptr, w_pg_sb, w_pg_st, w_kl_ptr, w_kl_sb, w_kl_st, params_ptr,
    token_loss_ptr, pg_ptr, kl_ptr, ratio_ptr, d_logp_ptr, d_ent_ptr, T,
    KL_ESTIMATOR: tl.constexpr, CISPO: tl.constexpr, SAPO: tl.constexpr, VESPO: tl.constexpr, DRO: tl.constexpr,
    DPPO: tl.constexpr, RATIO_CAP: tl.constexpr, DUAL_CLIP: tl.constexpr,
    HAS_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = t < T
    idx = b * T + t
    logp = _load_bt(logp_ptr, logp_sb, logp_st, b, t, ok)
    old = _load_bt(old_ptr, old_sb, old_st, b, t, ok)
    ref = _load_bt(ref_ptr, ref_sb, ref_st, b, t, ok)
    adv = _load_bt(adv_ptr, adv_sb, adv_st, b, t, ok)
    w_pg = _load_bt(w_pg_ptr, w_pg_sb, w_pg_st, b, t, ok)
    w_kl = _load_bt(w_kl_ptr, w_kl_sb, w_kl_st, b, t, ok)
    # Clip bounds and coefficients come from memory in the tensors' dtype, as torch rounds them.
    ratio_low = tl.load(params_ptr)
    ratio_high = tl.load(params_ptr + 1)

    ratio = tl.exp(logp - old)
    if CISPO:  # -sg(clip(rho)) A logp: the clipped weight is a constant, the gradient flows through logp
        weight = -adv * tl.minimum(tl.maximum(ratio, ratio_low), ratio_high)
        pg = weight * logp
        d_pg_logp = weight
    elif VESPO:  # -sg(phi(rho)) A logp, phi(w) = exp(lam + k log w - lam w), (k, lam) by the sign of A; 0 if not finite
        nonnegative = adv >= 0
        k = tl.where(nonnegative, tl.load(params_ptr + 7), tl.load(params_ptr + 9))
        lam = tl.where(nonnegative, tl.load(params_ptr + 8), tl.load(params_ptr + 10))
        phi = tl.exp(lam + k * tl.log(ratio) - lam * ratio)
        weight = -adv * tl.where(tl.abs(phi) < float("inf"), phi, 0.0)  # NaN compares False too
        pg = weight * logp
        d_pg_logp = weight
    elif DRO:  # -(A logp - beta / 2 (logp - old)^2)
        log_ratio = logp - old
        beta = tl.load(params_ptr + 13)
        pg = -(adv * logp - 0.5 * beta * log_ratio * log_ratio)
        d_pg_logp = beta * log_ratio - adv
    elif DPPO != 0:  # -sg(min(rho, c)) A logp within the divergence threshold of A's side (1: TV, 2: binary KL)
        prob = tl.exp(logp)
        old_prob = tl.exp(old)
        positive = adv > 0
        eps_low = tl.load(params_ptr + 11)
        eps_high = tl.load(params_ptr + 12)
        if DPPO == 1:
            within = tl.where(positive, prob - old_prob <= eps_high, prob - old_prob >= -eps_low)
        else:
            binary_kl = old_prob * (old - logp) + (1.0 - old_prob) * tl.log((1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
            within = tl.where(positive, (binary_kl <= eps_high) | (prob <= old_prob),
                              (binary_kl <= eps_low) | (prob >= old_prob))
        weight = tl.where(within, -adv * tl.minimum(ratio, tl.load(params_ptr + 2)), 0.0)
        pg = weight * logp
        d_pg_logp = weight
    elif SAPO:  # -sigmoid(tau (rho - 1)) 4 / tau A, tau by the advantage's sign
        tau = tl.where(adv > 0, tl.load(params_ptr + 5), tl.load(params_ptr + 6))
        gate = tl.sigmoid(tau * (ratio - 1.0))
        pg = -gate * (4.0 / tau) * adv
        d_pg_logp = -4.0 * adv * gate * (1.0 - gate) * ratio
    else:
        if RATIO_CAP:  # two-sided: the unclipped branch's ratio is capped too (slope 0 above the cap)
            cap = tl.load(params_ptr + 4)
            unclipped = -adv * tl.minimum(ratio, cap)
            slope = tl.where(ratio <= cap, -adv, 0.0)
        else:
            unclipped = -adv * ratio
            slope = -adv
        clipped = -adv * tl.minimum(tl.maximum(ratio, ratio_low), ratio_high)
        pg = tl.maximum(unclipped, clipped)
        # d pg / d ratio is the unclipped branch's slope wherever it attains the max; the clipped branch has
        # slope 0 outside the clip range, and ties happen only inside it (equal slopes) or at A = 0.
        d_pg = tl.where(unclipped >= clipped, slope, 0.0)
        if DUAL_CLIP:
            capped = -adv * tl.load(params_ptr + 2)
            negative = adv < 0
            # torch.minimum splits the gradient of a tie in half
            cap_share = tl.where(pg < capped, 1.0, tl.where(pg == capped, 0.5, 0.0))
            d_pg = tl.where(negative, d_pg * cap_share, d_pg)
            pg = tl.where(negative, tl.minimum(pg, capped), pg)
        d_pg_logp = d_pg * ratio

    delta = ref - logp
    if KL_ESTIMATOR == 0:  # k1 = -delta
        kl = -delta
        d_kl = tl.full(delta.shape, 1.0, delta.dtype)
    elif KL_ESTIMATOR == 1:  # k2 = delta^2 / 2
        kl = 0.5 * delta * delta
        d_kl = -delta
    else:  # k3 = exp(delta) - delta - 1
        exp_delta = tl.exp(delta)
        kl = exp_delta - delta - 1.0
        d_kl = 1.0 - exp_delta

    token_loss = w_pg * pg + w_kl * kl
    d_logp = w_pg * d_pg_logp + w_kl * d_kl
    if HAS_ENTROPY:
        entropy = _load_bt(ent_ptr, ent_sb, ent_st, b, t, ok)
        d_ent = -tl.load(params_ptr + 3) * w_pg
        token_loss += d_ent * entropy
        tl.store(d_ent_ptr + idx, d_ent, mask=ok)
    tl.store(token_loss_ptr + idx, token_loss, mask=ok)
    tl.store(pg_ptr + idx, pg, mask=ok)
    tl.store(kl_ptr + idx, kl, mask=ok)
    tl.store(ratio_ptr + idx, ratio, mask=ok)
    tl.store(d_logp_ptr + idx, d_logp, mask=ok)


@functools.lru_cache(maxsize=64)
def _params_on(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The kernel's parameters as a tensor, copied to the device once per (values, dtype, device): a
    ``torch.tensor(..., device=cuda)`` waits for the stream (a host sync), and the one-pass sweep runs the
    epilogue once per chunk. Never written (the kernel only reads it)."""
    return torch.tensor(values, dtype=dtype, device=device)


def launch_apo_epilogue_terms(
    logps: torch.Tensor, entropy: Optional[torch.Tensor], old_logps: torch.Tensor, ref_logps: torch.Tensor,
    advantages: torch.Tensor, w_pg: torch.Tensor, w_kl: torch.Tensor, token_loss: torch.Tensor, pg: torch.Tensor,
    kl: torch.Tensor, ratio: torch.Tensor, d_logp: torch.Tensor, d_entropy: Optional[torch.Tensor],
    kl_estimator: int, cispo: bool, sapo_taus: Optional[list[float]], vespo_shapes: Optional[list[float]],
    dro_beta: Optional[float], dppo: int, eps_low: float, eps_high: float, ratio_low: float, ratio_high: float,
    ratio_cap: Optional[float], clip_ratio_c: Optional[float], entropy_coef: float,
) -> None:
    """Fill the contiguous ``(B, T)`` outputs from the ``(B, T)`` views (read in place through their strides)."""
    batch, length = logps.shape
    if logps.numel() == 0:
        return
    views = (logps, logps if entropy is None else entropy, old_logps, ref_logps, advantages, w_pg, w_kl)
    # Clip bounds and coefficients in the tensors' dtype, as torch rounds them (a float scalar argument would be
    # rounded to float32).
    cap = clip_ratio_c if clip_ratio_c is not None else (float("inf") if dppo else 0.0)  # DPPO: no truncation
    values = (ratio_low, ratio_high, cap, entropy_coef, ratio_cap or 0.0, *(sapo_taus or (1.0, 1.0)),
              *(vespo_shapes or (0.0,) * 4), eps_low, eps_high, dro_beta or 0.0)
    # a fake tensor must not outlive its mode in the cache
    params = (torch.tensor(values, dtype=logps.dtype, device=logps.device) if isinstance(logps, FakeTensor)
              else _params_on(values, logps.dtype, logps.device))
    with on_device_of(logps):
        _apo_epilogue_kernel[(batch, triton.cdiv(length, BLOCK))](
            *(arg for x in views for arg in (x, *x.stride())), params, token_loss, pg, kl, ratio, d_logp, d_entropy,
            length, KL_ESTIMATOR=kl_estimator, CISPO=cispo, SAPO=sapo_taus is not None,
            VESPO=vespo_shapes is not None, DRO=dro_beta is not None, DPPO=dppo, RATIO_CAP=ratio_cap is not None,
            DUAL_CLIP=clip_ratio_c is not None and not dppo, HAS_ENTROPY=entropy is not None, BLOCK=BLOCK,
        )


apo_epilogue_terms_op = torch.library.custom_op(
    "apo_kernels::apo_epilogue_terms", launch_apo_epilogue_terms,
    mutates_args=("token_loss", "pg", "kl", "ratio", "d_logp", "d_entropy"),
)


@apo_epilogue_terms_op.register_fake
def _(logps, entropy, old_logps, ref_logps, advantages, w_pg, w_kl, token_loss, pg, kl, ratio, d_logp, d_entropy,
      kl_estimator, cispo, sapo_taus, vespo_shapes, dro_beta, dppo, eps_low, eps_high, ratio_low, ratio_high,
      ratio_cap, clip_ratio_c, entropy_coef) -> None:
    return None


def _run_terms(logps, entropy, old_logps, ref_logps, advantages, w_pg, w_kl, config):
    """``(token_loss, pg, kl, ratio, d_logp, d_entropy or None)``, fresh ``(B, T)`` tensors from one launch."""
    has_entropy = entropy is not None and config.entropy_coef != 0
    # Separate allocations: views of one buffer would share a version counter with the saved d_logp.
    token_loss, pg, kl, ratio, d_logp = (torch.empty_like(logps, memory_format=torch.contiguous_format) for _ in range(5))
    d_entropy = torch.empty_like(d_logp) if has_entropy else None
    eager_or_op(apo_epilogue_terms_op, launch_apo_epilogue_terms, logps)(
        logps, entropy if has_entropy else None, old_logps, ref_logps, advantages, w_pg, w_kl,
        token_loss, pg, kl, ratio, d_logp, d_entropy, KL_ESTIMATOR_IDS[config.kl_estimator],
        config.policy_loss == "cispo",
        [config.sapo_tau_pos, config.sapo_tau_neg] if config.policy_loss == "sapo" else None,
        [config.vespo_k_pos, config.vespo_lambda_pos, config.vespo_k_neg, config.vespo_lambda_neg]
        if config.policy_loss == "vespo" else None,
        config.dro_beta if config.policy_loss == "dro" else None, DPPO_IDS.get(config.policy_loss, 0),
        config.eps_low, config.eps_high,
        1.0 - config.eps_low, 1.0 + config.eps_high, config.ratio_cap,
        config.clip_ratio_c, config.entropy_coef,
    )
    return token_loss, pg, kl, ratio, d_logp, d_entropy


def apo_epilogue_grads(logps, entropy, old_logps, ref_logps, advantages, w_pg, w_kl, config):
    """Same contract as ``apo_kernels.objective.torch_epilogue_grads``: the derivatives the kernel writes."""
    return _run_terms(logps, entropy, old_logps, ref_logps, advantages, w_pg, w_kl, config)[4:]


class _EpilogueLoss(torch.autograd.Function):
    """The summed loss; its backward scales the derivatives the kernel already wrote."""

    @staticmethod
    def forward(ctx, logps, entropy, old_logps, ref_logps, advantages, w_pg, w_kl, config):
        token_loss, pg, kl, ratio, d_logp, d_entropy = _run_terms(
            logps, entropy, old_logps, ref_logps, advantages, w_pg, w_kl, config
        )
        ctx.save_for_backward(d_logp, d_entropy)
        ctx.mark_non_differentiable(pg, kl, ratio)
        return token_loss.sum(), pg, kl, ratio

    @staticmethod
    def backward(ctx, grad_loss, *_):
        d_logp, d_entropy = ctx.saved_tensors
        d_entropy = None if d_entropy is None else grad_loss * d_entropy
        return grad_loss * d_logp, d_entropy, None, None, None, None, None, None


def apo_epilogue(
    logps: torch.Tensor,
    entropy: Optional[torch.Tensor],
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    advantages: torch.Tensor,
    w_pg: torch.Tensor,
    w_kl: torch.Tensor,
    config: APOConfig,
) -> EpilogueOutput:
    """Same contract as ``apo_kernels.objective.torch_epilogue``: ``(B, T)`` tensors of one float dtype
    (views, strided or expanded, are read in place); the loss is differentiable wrt ``logps`` and
    ``entropy``."""
    loss, pg, kl, ratio = _EpilogueLoss.apply(logps, entropy, old_logps, ref_logps, advantages, w_pg, w_kl, config)
    return EpilogueOutput(loss=loss, pg=pg, kl=kl, ratio=ratio)
