"""The implementations the benchmarks measure, as one table: :data:`IMPLS`, a name to an :class:`Impl`.

Every implementation has two passes:

- ``fwd``: the log-probs (and, where the implementation can, entropies) of the sampled tokens under
  ``torch.no_grad``: the old-policy / reference log-prob pass of every RL step.
- ``fwd+bwd``: one loss step, forward and backward. Every implementation computes the same loss, GRPO with a
  KL loss (APO with DADS and STCR off, :data:`APO_CONFIG`): log-probs of the sampled tokens from
  ``hidden @ weight.T`` (temperature 1), the clipped policy term against ``old_logps`` with per-sequence
  advantages, the k3 KL against ``ref_logps`` weighted by ``BETA``, both averaged over all tokens of the
  micro-batch (TRL/Liger ``loss_type="bnpo"``, verl ``token-mean``); ``hidden`` and ``weight`` both get
  gradients (the LM head is trained, as with tied embeddings). Where an implementation only produces
  log-probs (TRL's fused LM head, ``apo_kernels-logprobs``), the loss on top of them is the library's own
  objective, :func:`apo_kernels.apo_objective`, as a trainer that takes only log-probs from a kernel
  computes it in torch.

Adding an implementation is one entry of :data:`IMPLS` (and, if it needs a package the GPU machine lacks, its
wheel in ``gpu_suite.sh``'s ``WHEELS``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

import torch
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
# The checkout's apo_kernels, also when a script runs from another directory and the package is not
# installed (sys.path[0] is this folder, not the repository): the measured code is the commit recorded.
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

from apo_kernels import APOConfig, apo_loss, apo_objective, fused_linear_logprobs, reference  # noqa: E402

BETA = 0.04  # TRL's and Liger's default KL coefficient
CLIP_EPS = 0.2
APO_CONFIG = APOConfig(
    beta=BETA,
    eps_low=CLIP_EPS,
    eps_high=CLIP_EPS,
    loss_agg_mode="token-mean",
    kl_agg_mode="token-mean",
    dads=False,
    stcr=False,
)
# trl 1.16's trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE, the vocabulary tile GRPOTrainer passes. Not imported
# from there: trl.trainer takes seconds to import, which a fwd-only worker would pay for one constant (a test
# checks the value against trl's source).
TRL_VOCAB_CHUNK = 32768


@dataclass
class Inputs:
    """What every step takes: one micro-batch of ``B`` responses of ``T`` tokens."""

    hidden: torch.Tensor  # (B, T, D), requires grad
    weight: torch.Tensor  # (V, D), requires grad
    targets: torch.Tensor  # (B, T) int64
    mask: torch.Tensor  # (B, T) bool, all True
    advantages: torch.Tensor  # (B,) float32
    old_logps: torch.Tensor  # (B, T) float32
    ref_logps: torch.Tensor  # (B, T) float32

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def grads_nbytes(self) -> int:
        return sum(t.grad.nbytes for t in (self.hidden, self.weight) if t.grad is not None)

    def clear_grads(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None


class SkippedCase(Exception):
    """The implementation cannot run here (package missing or too old)."""


# fwd: returns the (B, T) log-probs, gradients off; fwd+bwd: returns the scalar loss.
Step = Callable[[Inputs], torch.Tensor]
# Builds a step for a device ("cuda" or "cpu"); raises SkippedCase when it cannot run here. Built once per
# worker and case, outside what is measured (imports, compilation settings).
StepBuilder = Callable[[str], Step]


@dataclass(frozen=True, kw_only=True)
class Impl:
    """One implementation: how to build its two passes, what it needs, which sweeps run it by default."""

    logprobs: Optional[StepBuilder] = None  # the fwd pass; None when it is the same call as fwd_same_as'
    fwd_same_as: Optional[str] = None  # the implementation whose fwd pass this one's is (not measured twice)
    loss: StepBuilder  # the fwd+bwd pass
    # Packages beyond apo_kernels, as pip spells them ("trl>=1.15"); a case without them is skipped.
    requires: tuple[str, ...] = ()
    default_on: tuple[str, ...] = ("cuda", "cpu")  # the devices whose default sweep runs it

    def __post_init__(self):
        if (self.logprobs is None) == (self.fwd_same_as is None):
            raise ValueError("an implementation has a fwd pass of its own (logprobs) or another's (fwd_same_as)")


# --- log-probs (the fwd pass, and the start of the loss of TRL and apo_kernels-logprobs) -----------------


def _reference_logprobs(device: str) -> Step:
    return lambda x: reference.linear_logprobs(x.hidden, x.weight, x.targets, return_entropy=True)[0]


def _apo_logprobs(device: str, backend: str = "auto") -> Step:
    return lambda x: fused_linear_logprobs(x.hidden, x.weight, x.targets, return_entropy=True, backend=backend)[0]


def _trl_logprobs(device: str) -> Step:
    from trl.kernels import ChunkedLogProbFunction

    def logprobs(x: Inputs) -> torch.Tensor:
        batch, seq_len, hidden = x.hidden.shape
        # Log-probs and entropies, as GRPOTrainer's fused LM head requests them.
        logps, _entropy, *_ = ChunkedLogProbFunction.apply(
            x.hidden.reshape(-1, hidden),
            x.weight,
            None,
            x.targets.reshape(-1),
            1.0,
            TRL_VOCAB_CHUNK,
            None,
            1.0,
            ("entropy",),
        )
        return logps.view(batch, seq_len)

    return logprobs


def _liger_logprobs(device: str) -> Step:
    # Liger has no log-prob entry point of its own; this is the chunked selective log-softmax its GRPO loss
    # runs (under no_grad for reference log-probs). It returns no entropy.
    from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase

    if not hasattr(LigerFusedLinearPPOBase, "chunk_forward"):
        raise SkippedCase("this liger-kernel has no LigerFusedLinearPPOBase.chunk_forward")
    return lambda x: LigerFusedLinearPPOBase.chunk_forward(x.hidden, x.weight, x.targets)


# --- losses (the fwd+bwd pass) ------------------------------------------------------------------------------


def _reference_loss(device: str) -> Step:
    return lambda x: (
        reference.apo_loss(
            x.hidden,
            x.weight,
            x.targets,
            x.mask,
            x.advantages,
            old_logps=x.old_logps,
            ref_logps=x.ref_logps,
            config=APO_CONFIG,
        ).loss
    )


def _apo_loss(device: str, backend: str = "auto", sweep: str = "auto") -> Step:
    return lambda x: (
        apo_loss(
            x.hidden,
            x.weight,
            x.targets,
            x.mask,
            x.advantages,
            old_logps=x.old_logps,
            ref_logps=x.ref_logps,
            config=APO_CONFIG,
            backend=backend,
            sweep=sweep,
        ).loss
    )


def _objective_on(logprobs: StepBuilder) -> StepBuilder:
    """The loss of a trainer that takes only log-probs from a kernel and writes the objective in torch
    (GRPOTrainer._compute_loss of trl 1.16 for loss_type="bnpo", token-level importance sampling): here the
    library's objective on those log-probs."""

    def build(device: str) -> Step:
        logps_of = logprobs(device)

        def step(x: Inputs) -> torch.Tensor:
            loss, _metrics = apo_objective(
                logps_of(x), x.mask, x.advantages, old_logps=x.old_logps, ref_logps=x.ref_logps, config=APO_CONFIG
            )
            return loss

        return step

    return build


def _liger_loss(device: str) -> Step:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    # torch.compile of the loss math is Liger's default, on GPU; it has no CPU backend worth using here.
    loss_fn = LigerFusedLinearGRPOLoss(
        beta=BETA,
        compiled=device == "cuda",
        use_ref_model=True,
        epsilon_low=CLIP_EPS,
        epsilon_high=CLIP_EPS,
        loss_type="bnpo",
        temperature=1.0,
    )

    def step(x: Inputs) -> torch.Tensor:
        loss, _metrics = loss_fn(
            x.hidden,
            x.weight,
            x.targets,
            x.mask,
            x.advantages,
            ref_per_token_logps=x.ref_logps,
            old_per_token_logps=x.old_logps,
        )
        return loss

    return step


# --- the table ----------------------------------------------------------------------------------------------

# In this order in the default sweeps (their workers, the tables' columns).
IMPLS: dict[str, Impl] = {
    # Materialized N x V float32 logits and autograd: a naive trainer (and the tests' oracle).
    "reference": Impl(logprobs=_reference_logprobs, loss=_reference_loss),
    # apo_loss as called by default: one pass where the workspace allows.
    "apo_kernels": Impl(logprobs=_apo_logprobs, loss=_apo_loss),
    # The logits recomputed in backward.
    "apo_kernels-two-pass": Impl(fwd_same_as="apo_kernels", loss=partial(_apo_loss, sweep="two-pass")),
    # The torch backend: on CPU what apo_kernels runs, on GPU the fallback; measured when asked for.
    "apo_kernels-torch": Impl(
        logprobs=partial(_apo_logprobs, backend="torch"),
        loss=partial(_apo_loss, backend="torch"),
        default_on=(),
    ),
    # Log-probs from the library, the loss in torch: a trainer that only swaps its log-prob kernel. Not in the
    # CPU sweep, which stays within minutes.
    "apo_kernels-logprobs": Impl(fwd_same_as="apo_kernels", loss=_objective_on(_apo_logprobs), default_on=("cuda",)),
    "liger": Impl(logprobs=_liger_logprobs, loss=_liger_loss, requires=("liger-kernel",)),
    # GRPOTrainer's fused LM head (ChunkedLogProbFunction, trl >= 1.15) and its loss math.
    "trl": Impl(logprobs=_trl_logprobs, loss=_objective_on(_trl_logprobs), requires=("trl>=1.15",)),
}


def default_impls(device: str) -> list[str]:
    return [name for name, impl in IMPLS.items() if device in impl.default_on]


def _check_requirements(requires: tuple[str, ...]) -> None:
    for requirement in map(Requirement, requires):
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            raise SkippedCase(f"{requirement.name} is not installed (needs {requirement})") from None
        if not requirement.specifier.contains(version, prereleases=True):
            raise SkippedCase(f"{requirement.name} {version} is installed, needs {requirement}")


def build_step(name: str, pass_: str, device: str) -> Step:
    """What pass ``pass_`` ("fwd" or "fwd+bwd") of implementation ``name`` runs on ``device`` (see
    :data:`Step`); raises :class:`SkippedCase` when it cannot run here."""
    impl = IMPLS[name]
    _check_requirements(impl.requires)
    if pass_ == "fwd+bwd":
        return impl.loss(device)
    if impl.logprobs is None:
        raise ValueError(f"implementation {name!r} has no fwd pass of its own: it is {impl.fwd_same_as!r}'s")
    return torch.no_grad()(impl.logprobs(device))
