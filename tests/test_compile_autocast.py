"""What PyTorch users expect of the public calls, for both backends (Triton in the interpreter on CPU):
``torch.compile(fullgraph=True)`` gives the eager results, masks included, and ``torch.autocast`` changes
nothing (the input dtypes set the precision)."""

import functools

import pytest
import torch

from apo_kernels import APOConfig, apo_loss, fused_linear_logprobs
from tests.strategies import assert_close, assert_compiled_matches_eager, make_linear_problem

# triton runs in the interpreter on CPU (tests/conftest.py)
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
B, T, D, V = 3, 5, 8, 300


def masked_case(dtype=torch.float32):
    p = make_linear_problem(B * T, D, V, seed=6, with_bias=True, temperature=0.7, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(B, T, generator=gen) > 0.35
    mask[1] = False  # a fully masked response
    targets = torch.where(mask, p.targets.view(B, T), -100)  # masked ids may be anything
    return p, mask, targets


def logprobs_loss(p, mask, targets, backend):
    def loss_fn(hidden, weight):
        logps, entropy = fused_linear_logprobs(
            hidden.view(B, T, D),
            weight,
            targets,
            bias=p.bias,
            temperature=0.7,
            return_entropy=True,
            mask=mask,
            backend=backend,
        )
        return (logps * 1.3).sum() + 0.1 * entropy.sum()

    return loss_fn


def apo_step(p, mask, targets, backend, sweep, **options):
    gen = torch.Generator().manual_seed(2)
    old = torch.randn(B, T, generator=gen) * 0.3 - 5
    ref = torch.randn(B, T, generator=gen) * 0.3 - 5
    advantages = torch.randn(B, generator=gen)
    config = APOConfig(beta=0.04, entropy_coef=0.01, temperature=0.7, **options)

    def loss_fn(hidden, weight):
        return apo_loss(
            hidden.view(B, T, D),
            weight,
            targets,
            mask,
            advantages,
            old_logps=old,
            ref_logps=ref,
            bias=p.bias,
            config=config,
            backend=backend,
            sweep=sweep,
        ).loss

    return loss_fn


MAKE_LOSS = [
    logprobs_loss,
    functools.partial(apo_step, sweep="one-pass"),
    functools.partial(apo_step, sweep="two-pass"),
    functools.partial(apo_step, sweep="one-pass", importance_sampling_level="sequence"),
    functools.partial(apo_step, sweep="auto", top_entropy_quantile=0.5),
]
MAKE_LOSS_IDS = [
    "fused_linear_logprobs",
    "apo_loss-one-pass",
    "apo_loss-two-pass",
    "apo_loss-one-pass-sequence-ratio",
    "apo_loss-entropy-masking",
]


@pytest.mark.parametrize("make_loss", MAKE_LOSS, ids=MAKE_LOSS_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_compile_with_a_mask_matches_eager(make_loss, backend):
    torch._dynamo.reset()
    p, mask, targets = masked_case()
    assert_compiled_matches_eager(make_loss(p, mask, targets, backend), p, fullgraph=True)


@pytest.mark.parametrize("make_loss", MAKE_LOSS, ids=MAKE_LOSS_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_changes_neither_values_nor_gradients(make_loss, backend):
    p, mask, targets = masked_case()
    loss_fn = make_loss(p, mask, targets, backend)

    def run(autocast):
        q = p.leaves()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(q.hidden, q.weight)
            grads = torch.autograd.grad(loss, [q.hidden, q.weight])
        return (loss, *grads)

    for name, a, b in zip(("loss", "d_hidden", "d_weight"), run(True), run(False)):
        assert a.dtype == b.dtype, name
        assert_close(a, b, 1e-6, name)
