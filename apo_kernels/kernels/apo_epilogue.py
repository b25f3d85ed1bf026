"""The APO epilogue in one elementwise kernel: each token's loss contribution and its derivatives.

The second copy of the per-token formula of ``apo_kernels.objective`` (``policy_term``, ``kl_penalty``,
``torch_epilogue``); ``tests/kernels/test_apo_epilogue.py`` pins the two together. The kernel writes
the weighted per-token loss and ``dL/dlogp`` in the same pass, so the backward is a scale. (The entropy bonus,
linear in the entropy, is the objective's: no kernel needed.)
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass, field, fields

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


def _slot():
    return field(metadata={"slot": True})


def _flag():
    return field(metadata={"slot": False})


@dataclass(frozen=True)
class EpilogueParams:
    """Everything the epilogue kernel takes besides its tensors, by name (in the style of Cut Cross-Entropy's
    ``CCEParams``). Its fields are the one table of the kernel's parameters:

    - the float *slots* (lower case), packed in field order into one tensor of the inputs' dtype, so the clip
      bounds and coefficients are rounded as torch rounds them (a float scalar argument would be rounded to
      float32); a slot's position among them is its offset, ``SLOT_<NAME>`` in the kernel (``PARAM_SLOTS``);
      slots the configuration does not use hold a neutral value;
    - the constexpr *flags* (upper case): the kernel's compile-time arguments of the same name (``FLAGS``), one
      compiled variant per combination.
    """

    ratio_low: float = _slot()  # 1 - eps_low: the lower clip bound of the ratio (PPO, CISPO)
    ratio_high: float = _slot()  # 1 + eps_high: the upper clip bound
    clip_ratio_c: float = _slot()  # the dual clip's cap c, DPPO's truncation of the ratio (inf: none)
    ratio_cap: float = _slot()  # the cap of PPO's unclipped ratio (read when RATIO_CAP)
    sapo_tau_pos: float = _slot()  # SAPO's temperature for A > 0
    sapo_tau_neg: float = _slot()  # SAPO's temperature for A <= 0
    vespo_k_pos: float = _slot()  # VESPO's k for A >= 0
    vespo_lambda_pos: float = _slot()  # VESPO's lambda for A >= 0
    vespo_k_neg: float = _slot()  # VESPO's k for A < 0
    vespo_lambda_neg: float = _slot()  # VESPO's lambda for A < 0
    eps_low: float = _slot()  # DPPO's divergence threshold for A <= 0
    eps_high: float = _slot()  # DPPO's divergence threshold for A > 0
    dro_beta: float = _slot()  # DRO's penalty coefficient
    KL_ESTIMATOR: int = _flag()  # KL_ESTIMATOR_IDS of the KL estimator
    CISPO: bool = _flag()  # the CISPO policy term
    SAPO: bool = _flag()  # the SAPO policy term
    VESPO: bool = _flag()  # the VESPO policy term
    DRO: bool = _flag()  # the DRO policy term
    DPPO: int = _flag()  # DPPO_IDS of the DPPO policy term; 0: not DPPO
    RATIO_CAP: bool = _flag()  # PPO two-sided: the unclipped branch's ratio capped at ratio_cap
    DUAL_CLIP: bool = _flag()  # PPO dual clip: the surrogate of A < 0 capped at -clip_ratio_c A
    KL_BIAS_CORRECTION: bool = _flag()  # the KL times the (differentiable) token ratio

    @classmethod
    def from_config(cls, config: APOConfig) -> "EpilogueParams":
        policy = config.policy_loss
        dppo = DPPO_IDS.get(policy, 0)
        sapo, vespo, dro = policy == "sapo", policy == "vespo", policy == "dro"
        # GMPO's -A rho is PPO's surrogate without a clip range (its clips act on the log-ratios in its sequence ratio)
        gmpo = policy == "gmpo"
        return cls(
            ratio_low=0.0 if gmpo else 1.0 - config.eps_low,
            ratio_high=float("inf") if gmpo else 1.0 + config.eps_high,
            clip_ratio_c=config.clip_ratio_c if config.clip_ratio_c is not None else (float("inf") if dppo else 0.0),
            ratio_cap=config.ratio_cap or 0.0,
            sapo_tau_pos=config.sapo_tau_pos if sapo else 1.0,
            sapo_tau_neg=config.sapo_tau_neg if sapo else 1.0,
            vespo_k_pos=config.vespo_k_pos if vespo else 0.0,
            vespo_lambda_pos=config.vespo_lambda_pos if vespo else 0.0,
            vespo_k_neg=config.vespo_k_neg if vespo else 0.0,
            vespo_lambda_neg=config.vespo_lambda_neg if vespo else 0.0,
            eps_low=config.eps_low,
            eps_high=config.eps_high,
            dro_beta=config.dro_beta if dro else 0.0,
            KL_ESTIMATOR=KL_ESTIMATOR_IDS[config.kl_estimator],
            CISPO=policy == "cispo",
            SAPO=sapo,
            VESPO=vespo,
            DRO=dro,
            DPPO=dppo,
            RATIO_CAP=config.ratio_cap is not None,
            DUAL_CLIP=config.clip_ratio_c is not None and not dppo,
            KL_BIAS_CORRECTION=config.kl_bias_correction,
        )

    def values(self) -> tuple[float, ...]:
        """The slots in ``PARAM_SLOTS`` order: the packed tensor's contents."""
        return tuple(getattr(self, name) for name in PARAM_SLOTS)

    def constexprs(self) -> dict:
        """The flags as the kernel's keyword arguments."""
        return {name: getattr(self, name) for name in FLAGS}

    def op_args(self) -> tuple[tuple[float, ...], tuple[int, ...]]:
        """``(values, flags)`` as the custom op takes them (its schema has no dataclasses)."""
        return tuple(float(x) for x in self.values()), tuple(int(getattr(self, name)) for name in FLAGS)

    @classmethod
    def from_op_args(cls, values: list[float], flags: list[int]) -> "EpilogueParams":
        if len(values) != len(PARAM_SLOTS) or len(flags) != len(FLAGS):
            raise ValueError(
                f"{len(PARAM_SLOTS)} values and {len(FLAGS)} flags expected, got {len(values)} and {len(flags)}"
            )
        return cls(
            **{name: float(x) for name, x in zip(PARAM_SLOTS, values)},
            **{name: _FLAG_TYPES[name](x) for name, x in zip(FLAGS, flags)},
        )


def variant_configs() -> dict[str, APOConfig]:
    """A configuration per compiled variant of the kernel (its flags: each KL estimator with each policy term and
    option), by name: what ``benchmarks/kernel_report.py`` compiles and the kernel's tests run."""
    policies = (
        "ppo",
        "ppo dual-clip",
        "ppo two-sided",
        "ppo kl-bias-correction",
        "cispo",
        "sapo",
        "vespo",
        "dro",
        "dppo_tv",
        "dppo_kl dual-clip",
    )
    return {
        f"{kl} {policy}": APOConfig(
            kl_estimator=kl,
            policy_loss=policy.split()[0],
            clip_ratio_c=3.0 if "dual" in policy else None,
            ratio_cap=1.3 if "two" in policy else None,
            dro_beta=0.7 if policy == "dro" else None,
            kl_bias_correction="kl-bias" in policy,
            beta=0.04,
        )
        for kl in KL_ESTIMATOR_IDS
        for policy in policies
    }


PARAM_SLOTS = tuple(f.name for f in fields(EpilogueParams) if f.metadata["slot"])
FLAGS = tuple(f.name for f in fields(EpilogueParams) if not f.metadata["slot"])
_FLAG_TYPES = {name: typing.get_type_hints(EpilogueParams)[name] for name in FLAGS}  # int or bool


def _offset(slot: str) -> tl.constexpr:
    return tl.constexpr(PARAM_SLOTS.index(slot))


# The kernel's offsets into the packed tensor: SLOT_<NAME> is the position of <name> in PARAM_SLOTS (Triton
# kernels read globals only as constexprs).
SLOT_RATIO_LOW = _offset("ratio_low")
SLOT_RATIO_HIGH = _offset("ratio_high")
SLOT_CLIP_RATIO_C = _offset("clip_ratio_c")
SLOT_RATIO_CAP = _offset("ratio_cap")
SLOT_SAPO_TAU_POS = _offset("sapo_tau_pos")
SLOT_SAPO_TAU_NEG = _offset("sapo_tau_neg")
SLOT_VESPO_K_POS = _offset("vespo_k_pos")
SLOT_VESPO_LAMBDA_POS = _offset("vespo_lambda_pos")
SLOT_VESPO_K_NEG = _offset("vespo_k_neg")
SLOT_VESPO_LAMBDA_NEG = _offset("vespo_lambda_neg")
SLOT_EPS_LOW = _offset("eps_low")
SLOT_EPS_HIGH = _offset("eps_high")
SLOT_DRO_BETA = _offset("dro_beta")
# The custom op's tensor lists, in the order of the kernel's pointer arguments.
INPUTS = ("logps", "old_logps", "ref_logps", "advantages", "w_pg", "w_kl")
OUTPUTS = ("token_loss", "pg", "kl", "ratio", "d_logp")


@triton.jit
def _load_bt(ptr, stride_b, stride_t, b, t, ok):
    """Element ``[b, t]`` of a ``(B, T)`` view (possibly strided or expanded)."""
    return tl.load(ptr + b * stride_b + t * stride_t, mask=ok, other=0.0)


@triton.jit
def _apo_epilogue_kernel(
    logp_ptr,
    logp_sb,
    logp_st,
    old_ptr,
    old_sb,
    old_st,
    ref_ptr,
    ref_sb,
    ref_st,
    adv_ptr,
    adv_sb,
    adv_st,
    w_pg_ptr,
    w_pg_sb,
    w_pg_st,
    w_kl_ptr,
    w_kl_sb,
    w_kl_st,
    params_ptr,
    token_loss_ptr,
    pg_ptr,
    kl_ptr,
    ratio_ptr,
    d_logp_ptr,
    T,
    KL_ESTIMATOR: tl.constexpr,
    CISPO: tl.constexpr,
    SAPO: tl.constexpr,
    VESPO: tl.constexpr,
    DRO: tl.constexpr,
    DPPO: tl.constexpr,
    RATIO_CAP: tl.constexpr,
    DUAL_CLIP: tl.constexpr,
    KL_BIAS_CORRECTION: tl.constexpr,
    BLOCK: tl.constexpr,
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
    ratio_low = tl.load(params_ptr + SLOT_RATIO_LOW)
    ratio_high = tl.load(params_ptr + SLOT_RATIO_HIGH)

    ratio = tl.exp(logp - old)
    if CISPO:  # -sg(clip(rho)) A logp: the clipped weight is a constant, the gradient flows through logp
        weight = -adv * tl.minimum(tl.maximum(ratio, ratio_low), ratio_high)
        pg = weight * logp
        d_pg_logp = weight
    elif VESPO:  # -sg(phi(rho)) A logp, phi(w) = exp(lam + k log w - lam w), (k, lam) by the sign of A; 0 if not finite
        nonnegative = adv >= 0
        k = tl.where(nonnegative, tl.load(params_ptr + SLOT_VESPO_K_POS), tl.load(params_ptr + SLOT_VESPO_K_NEG))
        lam = tl.where(
            nonnegative, tl.load(params_ptr + SLOT_VESPO_LAMBDA_POS), tl.load(params_ptr + SLOT_VESPO_LAMBDA_NEG)
        )
        phi = tl.exp(lam + k * tl.log(ratio) - lam * ratio)
        weight = -adv * tl.where(tl.abs(phi) < float("inf"), phi, 0.0)  # NaN compares False too
        pg = weight * logp
        d_pg_logp = weight
    elif DRO:  # -(A logp - beta / 2 (logp - old)^2)
        log_ratio = logp - old
        beta = tl.load(params_ptr + SLOT_DRO_BETA)
        pg = -(adv * logp - 0.5 * beta * log_ratio * log_ratio)
        d_pg_logp = beta * log_ratio - adv
    elif DPPO != 0:  # -sg(min(rho, c)) A logp within the divergence threshold of A's side (1: TV, 2: binary KL)
        prob = tl.exp(logp)
        old_prob = tl.exp(old)
        positive = adv > 0
        eps_low = tl.load(params_ptr + SLOT_EPS_LOW)
        eps_high = tl.load(params_ptr + SLOT_EPS_HIGH)
        if DPPO == 1:
            within = tl.where(positive, prob - old_prob <= eps_high, prob - old_prob >= -eps_low)
        else:
            binary_kl = old_prob * (old - logp) + (1.0 - old_prob) * tl.log(
                (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8)
            )
            within = tl.where(
                positive, (binary_kl <= eps_high) | (prob <= old_prob), (binary_kl <= eps_low) | (prob >= old_prob)
            )
        weight = tl.where(within, -adv * tl.minimum(ratio, tl.load(params_ptr + SLOT_CLIP_RATIO_C)), 0.0)
        pg = weight * logp
        d_pg_logp = weight
    elif SAPO:  # -sigmoid(tau (rho - 1)) 4 / tau A, tau by the advantage's sign
        tau = tl.where(adv > 0, tl.load(params_ptr + SLOT_SAPO_TAU_POS), tl.load(params_ptr + SLOT_SAPO_TAU_NEG))
        gate = tl.sigmoid(tau * (ratio - 1.0))
        pg = -gate * (4.0 / tau) * adv
        d_pg_logp = -4.0 * adv * gate * (1.0 - gate) * ratio
    else:
        if RATIO_CAP:  # two-sided: the unclipped branch's ratio is capped too (slope 0 above the cap)
            cap = tl.load(params_ptr + SLOT_RATIO_CAP)
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
            capped = -adv * tl.load(params_ptr + SLOT_CLIP_RATIO_C)
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
    if KL_BIAS_CORRECTION:  # kl * rho, d rho / d logp = rho
        d_kl = (d_kl + kl) * ratio
        kl = kl * ratio

    token_loss = w_pg * pg + w_kl * kl
    d_logp = w_pg * d_pg_logp + w_kl * d_kl
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


def _params_of(config: APOConfig) -> tuple[EpilogueParams, tuple]:
    """``EpilogueParams.from_config`` and its ``op_args()``."""
    params = EpilogueParams.from_config(config)
    return params, params.op_args()


# Eager calls build the parameters once per distinct configuration (~15 us of Python otherwise, as much as the custom
# op's dispatch that launch.py avoids; the one-pass sweep runs the epilogue once per chunk). torch.compile traces
# _params_of itself (it would warn about the cache) and the launcher runs behind the custom op.
_cached_params_of = functools.lru_cache(maxsize=64)(_params_of)
_params_from_op_args = functools.lru_cache(maxsize=64)(EpilogueParams.from_op_args)


def launch_apo_epilogue_terms(
    inputs: list[torch.Tensor],
    outputs: list[torch.Tensor],
    values: list[float],
    flags: list[int],
) -> None:
    """Fill the contiguous ``(B, T)`` ``outputs`` (``OUTPUTS``) from the ``(B, T)`` views ``inputs`` (``INPUTS``, read
    in place through their strides), with the parameters ``EpilogueParams.op_args()``."""
    params = _params_from_op_args(tuple(values), tuple(flags))
    if len(inputs) != len(INPUTS) or len(outputs) != len(OUTPUTS):
        raise ValueError(
            f"inputs {INPUTS} and outputs {OUTPUTS} expected, got {len(inputs)} and {len(outputs)} tensors"
        )
    logps = inputs[0]
    batch, length = logps.shape
    if logps.numel() == 0:
        return
    # a fake tensor must not outlive its mode in the cache
    packed = (
        torch.tensor(params.values(), dtype=logps.dtype, device=logps.device)
        if isinstance(logps, FakeTensor)
        else _params_on(params.values(), logps.dtype, logps.device)
    )
    with on_device_of(logps):
        _apo_epilogue_kernel[(batch, triton.cdiv(length, BLOCK))](
            *(arg for x in inputs for arg in (x, *x.stride())),
            packed,
            *outputs,
            length,
            **params.constexprs(),
            BLOCK=BLOCK,
        )


apo_epilogue_terms_op = torch.library.custom_op(
    "apo_kernels::apo_epilogue_terms",
    launch_apo_epilogue_terms,
    mutates_args=("outputs",),
)


@apo_epilogue_terms_op.register_fake
def _(inputs, outputs, values, flags) -> None:
    return None


def _run_terms(logps, old_logps, ref_logps, advantages, w_pg, w_kl, config):
    """``(token_loss, pg, kl, ratio, d_logp)``, fresh ``(B, T)`` tensors from one launch."""
    params_of = _params_of if torch.compiler.is_compiling() else _cached_params_of
    _, op_args = params_of(config)
    # Separate allocations: views of one buffer would share a version counter with the saved d_logp.
    outputs = [torch.empty_like(logps, memory_format=torch.contiguous_format) for _ in OUTPUTS]
    inputs = [logps, old_logps, ref_logps, advantages, w_pg, w_kl]
    eager_or_op(apo_epilogue_terms_op, launch_apo_epilogue_terms, logps)(inputs, outputs, *op_args)
    return tuple(outputs)


def apo_epilogue_grads(logps, old_logps, ref_logps, advantages, w_pg, w_kl, config):
    """Same contract as ``apo_kernels.objective.torch_epilogue_grads``: the derivatives the kernel writes."""
    return _run_terms(logps, old_logps, ref_logps, advantages, w_pg, w_kl, config)[4]


class _EpilogueLoss(torch.autograd.Function):
    """The summed loss; its backward scales the derivatives the kernel already wrote."""

    @staticmethod
    def forward(ctx, logps, old_logps, ref_logps, advantages, w_pg, w_kl, config):
        token_loss, pg, kl, ratio, d_logp = _run_terms(logps, old_logps, ref_logps, advantages, w_pg, w_kl, config)
        ctx.save_for_backward(d_logp)
        ctx.mark_non_differentiable(pg, kl, ratio)
        return token_loss.sum(), pg, kl, ratio

    @staticmethod
    def backward(ctx, grad_loss, *_):
        (d_logp,) = ctx.saved_tensors
        return grad_loss * d_logp, None, None, None, None, None, None


def apo_epilogue(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    advantages: torch.Tensor,
    w_pg: torch.Tensor,
    w_kl: torch.Tensor,
    config: APOConfig,
) -> EpilogueOutput:
    """Same contract as ``apo_kernels.objective.torch_epilogue``: ``(B, T)`` tensors of one float dtype
    (views, strided or expanded, are read in place); the loss is differentiable wrt ``logps``."""
    loss, pg, kl, ratio = _EpilogueLoss.apply(logps, old_logps, ref_logps, advantages, w_pg, w_kl, config)
    return EpilogueOutput(loss=loss, pg=pg, kl=kl, ratio=ratio)
