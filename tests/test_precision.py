"""Precision against float64, pinned for every backend on the same cases, and peers' failures.

One bound per input dtype (the README's precision table): the relative error (norm) of log-probs and
entropies, and of every gradient, against the float64 oracle on the same input values, over the logit
profiles of ``tests/strategies.py`` (logits up to |z| ~ 300). 16-bit gradients are bounded by the rounding
of ``dz`` to the input dtype before the ``dz W`` and ``dz^T X`` matmuls (the Triton interpreter rounds
float32 -> bf16 by truncation, about twice the error of the GPU's round-to-nearest).

Liger-Kernel once computed ``hidden @ weight.T`` in bf16 and upcast the *rounded* logits to float32. The
upcast of bf16 inputs is exact, and products of bf16 numbers are exact in float32, so a correct
implementation gets log-probs and entropies of bf16 inputs to float32 accuracy; rounding the logits
to bf16 costs ~|z| 2^-9 per logit and is caught by a 1e-5 bound.
"""

import pytest
import torch

from apo_kernels import fused_linear_logprobs, reference
from tests.strategies import LOGIT_PROFILES, make_linear_problem, oracle_linear, relative_error, run_linear

# triton runs in the interpreter on CPU (tests/conftest.py)
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
# The interpreter evaluates masked lanes too (0 * -inf in discarded tile tails): numpy warns, results are unaffected.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


VALUE_BOUND = 1e-5  # log-probs and entropies: float32 compute for every 16/32-bit input
GRADIENT_BOUND = {torch.float64: 1e-10, torch.float32: 2e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("profile", LOGIT_PROFILES)
def test_every_backend_meets_the_documented_bound(backend, dtype, profile):
    problem = make_linear_problem(
        33, 40, 1031, seed=0, profile=profile, with_bias=True, temperature=0.7, block=128, dtype=dtype
    )
    got = run_linear(
        problem,
        lambda p: fused_linear_logprobs(
            p.hidden, p.weight, p.targets, bias=p.bias, temperature=0.7, return_entropy=True, backend=backend
        ),
    )
    exact = run_linear(problem.upcast(), oracle_linear)
    for name, g, e in zip(("logps", "entropy", "d_hidden", "d_weight", "d_bias"), got, exact):
        bound = VALUE_BOUND if name in ("logps", "entropy") else GRADIENT_BOUND[dtype]
        err = relative_error(g, e)
        assert err < bound, f"{name}: relative error {err:.2e} >= {bound:.0e}"


def bf16_rounded_logits_logprobs(problem):
    """The failure mode, as a control: bf16 matmul output, then float32."""
    logits = (problem.hidden @ problem.weight.T).float() / problem.temperature
    log_probs = torch.log_softmax(logits, -1)
    return log_probs.gather(-1, problem.targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("profile", ["normal", "block_offsets"])
def test_bf16_inputs_give_float32_accurate_logprobs(backend, profile):
    problem = make_linear_problem(24, 72, 1031, seed=4, profile=profile, temperature=0.7, dtype=torch.bfloat16)
    exact_logps, exact_entropy = reference.linear_logprobs(
        problem.hidden.double(), problem.weight.double(), problem.targets, temperature=0.7, return_entropy=True
    )
    logps, entropy = fused_linear_logprobs(
        problem.hidden, problem.weight, problem.targets, temperature=0.7, return_entropy=True, backend=backend
    )
    assert relative_error(logps, exact_logps) < 1e-5
    assert relative_error(entropy, exact_entropy) < 1e-5
    # the bound is tight enough to catch logits rounded to bf16
    assert relative_error(bf16_rounded_logits_logprobs(problem), exact_logps) > 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "hidden_dtype, weight_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)]
)
def test_mixed_dtypes_are_promoted_to_float32(backend, hidden_dtype, weight_dtype):
    """The documented rule: different hidden and weight dtypes (e.g. a head kept in float32) multiply as
    float32 operands (nothing is rounded down), and each gradient comes back in its input's dtype."""
    problem = make_linear_problem(
        33, 40, 1031, seed=2, profile="block_offsets", with_bias=True, temperature=0.7, block=128, dtype=torch.float32
    ).astype(hidden_dtype, weight_dtype)
    got = run_linear(
        problem,
        lambda p: fused_linear_logprobs(
            p.hidden, p.weight, p.targets, bias=p.bias, temperature=0.7, return_entropy=True, backend=backend
        ),
    )
    exact = run_linear(problem.upcast(), oracle_linear)
    assert [g.dtype for g in got] == [torch.float32, torch.float32, hidden_dtype, weight_dtype, weight_dtype]
    # float32 operands: the gradients are float32-accurate before their final rounding to the input dtype
    rounding = {torch.float32: 2e-4, torch.bfloat16: 2**-8, torch.float16: 2**-11}
    for name, g, e, bound in zip(
        ("logps", "entropy", "d_hidden", "d_weight", "d_bias"),
        got,
        exact,
        (VALUE_BOUND, VALUE_BOUND, rounding[hidden_dtype], rounding[weight_dtype], rounding[weight_dtype]),
    ):
        err = relative_error(g, e)
        assert err < bound, f"{name}: relative error {err:.2e} >= {bound:.0e}"
