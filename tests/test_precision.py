"""Peers' precision failures, pinned for every backend.

Liger-Kernel once computed ``hidden @ weight.T`` in bf16 and upcast the *rounded* logits to float32. The
upcast of bf16 inputs is exact, and products of bf16 numbers are exact in float32, so a correct
implementation gets log-probs and entropies of bf16 inputs to float32 accuracy; rounding the logits
to bf16 costs ~|z| 2^-9 per logit and is caught by a 1e-5 bound.
"""

import pytest
import torch

from apo_kernels import fused_linear_logprobs, reference
from tests.strategies import make_linear_problem, relative_error

BACKENDS = ["torch", "triton"]  # triton runs in the interpreter on CPU (tests/conftest.py)
# The interpreter evaluates masked lanes too (0 * -inf in discarded tile tails): numpy warns, results are unaffected.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


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
