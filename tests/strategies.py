"""Shared hypothesis strategies and comparison helpers for every backend's tests.

Problems are drawn as small shapes that fit no tile or chunk, with logit profiles chosen to break the
known failure modes: offsets of +-30 across vocabulary blocks (online max rescaling), all-negative
logits (a tail padded with 0 instead of -inf wins the max), one dominant logit (entropy near 0) and
temperatures other than 1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from hypothesis import strategies as st

LOGIT_PROFILES = ("normal", "block_offsets", "all_negative", "peaked")
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@dataclass(frozen=True)
class LinearProblem:
    hidden: torch.Tensor  # (N, D)
    weight: torch.Tensor  # (V, D)
    targets: torch.Tensor  # (N,)
    bias: Optional[torch.Tensor]
    temperature: float
    profile: str

    def astype(self, dtype: torch.dtype, weight_dtype: Optional[torch.dtype] = None) -> "LinearProblem":
        cast = lambda x, d: None if x is None else x.detach().to(d)
        return replace(
            self,
            hidden=cast(self.hidden, dtype),
            weight=cast(self.weight, weight_dtype or dtype),
            bias=cast(self.bias, weight_dtype or dtype),
        )

    def logit_magnitude(self) -> float:
        """``max |z|`` over the logits: float32 rounding of each logit grows with it."""
        z = self.hidden.double() @ self.weight.double().T / self.temperature
        if self.bias is not None:
            z = z + self.bias.double()
        return z.abs().max().item() if z.numel() else 0.0

    def to(self, device) -> "LinearProblem":
        """The same problem with every tensor on ``device``."""
        move = lambda x: None if x is None else x.to(device)
        return replace(
            self, hidden=move(self.hidden), weight=move(self.weight), targets=move(self.targets), bias=move(self.bias)
        )

    def upcast(self) -> "LinearProblem":
        """The same values in float64: the oracle's inputs (exact for every lower precision)."""
        return self.astype(torch.float64)

    def leaves(self) -> "LinearProblem":
        """A copy whose float inputs are fresh autograd leaves."""
        leaf = lambda x: None if x is None else x.detach().clone().requires_grad_(True)
        return replace(self, hidden=leaf(self.hidden), weight=leaf(self.weight), bias=leaf(self.bias))


def make_linear_problem(
    n_tokens: int,
    hidden_size: int,
    vocab: int,
    *,
    seed: int,
    profile: str = "normal",
    with_bias: bool = False,
    temperature: float = 1.0,
    block: int = 16,
    dtype: torch.dtype = torch.float64,
) -> LinearProblem:
    """A random LM-head problem; the logit profile is set through feature 0 (hidden[:, 0] = 1)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_tokens, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) / hidden_size**0.5
    hidden[:, 0] = 1.0
    if profile == "block_offsets":
        signs = torch.tensor([30.0, -30.0], dtype=torch.float64)
        weight[:, 0] = signs[(torch.arange(vocab) // block) % 2]
    elif profile == "all_negative":
        weight[:, 0] = -200.0
    elif profile == "peaked":
        weight[torch.randint(0, vocab, (1,), generator=gen), 0] = 40.0
    targets = torch.randint(0, vocab, (n_tokens,), generator=gen)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64) if with_bias else None
    problem = LinearProblem(hidden, weight, targets, bias, temperature, profile)
    return problem.astype(dtype)


@st.composite
def linear_problems(draw, *, max_tokens: int = 24, max_hidden: int = 20, max_vocab: int = 200, dtype=torch.float64):
    """Hypothesis strategy over :class:`LinearProblem` (shapes deliberately include 1 and primes)."""
    return make_linear_problem(
        draw(st.integers(1, max_tokens)),
        draw(st.integers(1, max_hidden)),
        draw(st.integers(1, max_vocab)),
        seed=draw(st.integers(0, 2**31 - 1)),
        profile=draw(st.sampled_from(LOGIT_PROFILES)),
        with_bias=draw(st.booleans()),
        temperature=draw(st.sampled_from([1.0, 0.7, 1.3])),
        block=draw(st.sampled_from([7, 16, 64])),
        dtype=dtype,
    )


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / max(||expected||, 1)`` in float64.

    Relative for outputs of norm >= 1 and absolute below: gradients that cancel to ~0 (e.g. all logits
    equal) have no meaningful relative error.
    """
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), "non-finite values in the result"
    scale = e.norm().item()
    return (a - e).norm().item() / max(scale, 1.0)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    err = relative_error(actual, expected)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.1e}"


def run_linear(problem: LinearProblem, fn, grad_seed: int = 0):
    """``fn(problem)``'s log-probs and entropies, and the gradients (hidden, weight[, bias]) of a random
    linear functional of both, on fresh leaves of ``problem``."""
    p = problem.leaves()
    logps, entropy = fn(p)
    # Drawn by the CPU generator (the same cotangents whatever the device), then moved to the log-probs' device.
    gen = torch.Generator().manual_seed(grad_seed)
    g_logp = torch.randn(logps.shape, generator=gen, dtype=torch.float64).to(logps.device)
    g_ent = torch.randn(entropy.shape, generator=gen, dtype=torch.float64).to(entropy.device)
    objective = (logps.double() * g_logp).sum() + (entropy.double() * g_ent).sum()
    inputs = [x for x in (p.hidden, p.weight, p.bias) if x is not None]
    grads = torch.autograd.grad(objective, inputs) if objective.requires_grad else [torch.zeros_like(x) for x in inputs]
    return (logps, entropy, *grads)


def driver_logprobs(hidden, weight, targets, bias, temperature, *, row_pass, tile=None, workspace_bytes=None):
    """The driver's two-pass sweep over every row with ``row_pass``, on ``tile`` (default: as planned within
    ``workspace_bytes``, default the device's)."""
    from apo_kernels import driver, plan

    if tile is None:
        budget = plan.default_workspace_bytes(hidden.device) if workspace_bytes is None else workspace_bytes
        tile = plan.plan_sweep("two-pass", hidden, weight, bias, row_pass, budget, needs_grad=(True, True)).tile
    return driver.SlabLinearLogprobs.apply(hidden, weight, bias, targets, temperature, row_pass, tile, None)


def tiled(row_pass, rows: int, cols: int):
    """The slab driver with ``row_pass`` and a forced tile of ``rows`` tokens x ``cols`` vocabulary columns."""
    from apo_kernels import plan

    return lambda p: driver_logprobs(
        p.hidden, p.weight, p.targets, p.bias, p.temperature, row_pass=row_pass, tile=plan.Tile(rows, cols)
    )


def oracle_linear(p: LinearProblem):
    from apo_kernels import reference

    return reference.linear_logprobs(
        p.hidden, p.weight, p.targets, bias=p.bias, temperature=p.temperature, return_entropy=True
    )


def assert_matches_oracle(problem: LinearProblem, fn) -> None:
    """``fn`` (a backend on ``problem``) against the float64 oracle on the same input values.

    Float64 must meet ``TOLERANCE``. Reduced precision computes in float32, whose rounding of each logit
    grows with ``max |z|``: it must meet ``TOLERANCE`` scaled by ``max |z| / 4`` (4: typical logits), or
    err no more than 8x the plain float32 materialized computation. Logits near +-100 move sum(p) by ~1e-5
    and gradients that should cancel keep that error times |W|: no float32 implementation does better.
    """
    dtype = problem.hidden.dtype
    got = run_linear(problem, fn)
    exact = run_linear(problem.upcast(), oracle_linear)
    plain = run_linear(problem, oracle_linear) if dtype != torch.float64 else exact
    names = ("logps", "entropy", "d_hidden", "d_weight", "d_bias")
    out_dtype = torch.float64 if torch.float64 in (problem.hidden.dtype, problem.weight.dtype) else torch.float32
    assert got[0].dtype == got[1].dtype == out_dtype
    for name, g, e, pl, x in zip(names, got, exact, plain, (None, None, problem.hidden, problem.weight, problem.bias)):
        if x is not None:
            assert g.dtype == x.dtype, f"{name} dtype {g.dtype} != input dtype {x.dtype}"
        tol = TOLERANCE[dtype]
        if dtype != torch.float64:
            tol = max(tol * max(1.0, problem.logit_magnitude() / 4), 8 * relative_error(pl, e))
        assert_close(g, e, tol, name)


def assert_compiled_matches_eager(loss_fn, problem: LinearProblem, **compile_kwargs) -> None:
    """``torch.compile(loss_fn)(hidden, weight)`` equals eager ``loss_fn``, gradients included."""
    compiled = torch.compile(loss_fn, backend="aot_eager", **compile_kwargs)
    eager_inputs, compiled_inputs = problem.leaves(), problem.leaves()
    eager = loss_fn(eager_inputs.hidden, eager_inputs.weight)
    eager.backward()
    out = compiled(compiled_inputs.hidden, compiled_inputs.weight)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(compiled_inputs.hidden.grad, eager_inputs.hidden.grad)
    torch.testing.assert_close(compiled_inputs.weight.grad, eager_inputs.weight.grad)
