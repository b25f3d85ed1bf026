"""The slab driver with the Triton row pass against the float64 oracle, run in the interpreter on CPU.

Tiles (token chunks x vocabulary slabs) and the kernels' column blocks are forced small, so that partial
slabs, partial column blocks and several token chunks all happen.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from apo_kernels import reference
from apo_kernels import plan
from apo_kernels.kernels import RowKernelParams, TritonRowPass
from tests.strategies import (
    assert_close,
    assert_matches_oracle,
    driver_logprobs,
    linear_problems,
    make_linear_problem,
    run_linear,
)

# The interpreter evaluates masked lanes too (0 * -inf in discarded tile tails): numpy warns, results are unaffected.
pytestmark = [pytest.mark.interpreter, pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

# (row pass, tile): 16-column blocks in 24-column slabs of 5 tokens
SMALL = (TritonRowPass(RowKernelParams(block=16, num_warps=1)), plan.Tile(5, 24))
# Vocabulary-sized cases: 128-column blocks in slabs of 3 blocks; 1031 = 2 slabs + 2 blocks + 7 columns.
WIDE = (TritonRowPass(RowKernelParams(block=128, num_warps=1)), plan.Tile(16, 384))


def linear_logprobs(hidden, weight, targets, bias, temperature, tiles):
    row_pass, tile = tiles
    return driver_logprobs(hidden, weight, targets, bias, temperature, row_pass=row_pass, tile=tile)


def triton_with(tiles):
    return lambda p: linear_logprobs(p.hidden, p.weight, p.targets, p.bias, p.temperature, tiles)


@settings(max_examples=40)
@given(problem=linear_problems(), dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]))
def test_values_and_gradients_match_the_float64_oracle(problem, dtype):
    assert_matches_oracle(problem.astype(dtype), triton_with(SMALL))


@pytest.mark.parametrize(
    "vocab, hidden_size, profile, dtype, temperature",
    [
        (1031, 40, "block_offsets", torch.float64, 0.7),
        (1031, 72, "all_negative", torch.float32, 1.3),
        (2053, 40, "peaked", torch.float32, 0.7),
        (2053, 72, "block_offsets", torch.bfloat16, 1.3),
        (1031, 40, "all_negative", torch.bfloat16, 0.7),
        (2053, 40, "normal", torch.float64, 1.3),
    ],
)
def test_real_vocab_tails_and_extreme_logits(vocab, hidden_size, profile, dtype, temperature):
    """Partial last vocabulary tile (1031 = 8 * 128 + 7), partial hidden slices, +-30 offsets that flip
    from one 128-column tile to the next, and all-negative logits (a tail padded with 0 would win)."""
    problem = make_linear_problem(
        33,
        hidden_size,
        vocab,
        seed=vocab + hidden_size,
        profile=profile,
        with_bias=True,
        temperature=temperature,
        block=WIDE[0].params.block,
        dtype=dtype,
    )
    assert_matches_oracle(problem, triton_with(WIDE))


def test_all_negative_logits_with_a_tail_are_exact():
    """The vocabulary tail must be -inf: a 0 there is the max of logits near -200 and shifts everything."""
    problem = make_linear_problem(5, 24, 40, seed=11, profile="all_negative", dtype=torch.float64)
    assert 40 % SMALL[1].cols != 0 and SMALL[1].cols % SMALL[0].params.block != 0
    got = run_linear(problem, triton_with(SMALL))
    exact = run_linear(
        problem,
        lambda p: reference.linear_logprobs(
            p.hidden, p.weight, p.targets, bias=p.bias, temperature=p.temperature, return_entropy=True
        ),
    )
    for name, g, e in zip(("logps", "entropy", "d_hidden", "d_weight"), got, exact):
        assert_close(g, e, 1e-10, name)


def test_mixed_dtypes_and_non_contiguous_inputs():
    problem = make_linear_problem(21, 40, 97, seed=5, with_bias=True, dtype=torch.float64)
    hidden = problem.hidden.to(torch.bfloat16).T.contiguous().T  # non-contiguous bf16 view
    weight = torch.cat([problem.weight, problem.weight], dim=1).float()[:, ::2]  # strided fp32 head
    targets = torch.stack([problem.targets, problem.targets], 1)[:, 0]  # strided targets
    assert not (hidden.is_contiguous() or weight.is_contiguous() or targets.is_contiguous())
    mixed = problem.__class__(hidden, weight, targets, problem.bias.float(), 1.0, "normal")
    got = run_linear(mixed, triton_with(SMALL))
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.bfloat16 and got[3].dtype == torch.float32
    exact = run_linear(mixed.upcast(), triton_with(SMALL))
    for name, g, e, tol in zip(
        ("logps", "entropy", "d_hidden", "d_weight", "d_bias"), got, exact, (1e-5, 1e-5, 2e-2, 1e-5, 1e-5)
    ):
        assert_close(g, e, tol, name)


@pytest.mark.parametrize("n_tokens", [1, 17])
def test_token_counts_that_fill_no_block(n_tokens):
    problem = make_linear_problem(n_tokens, 8, 37, seed=n_tokens, with_bias=True, temperature=0.7)
    assert_matches_oracle(problem, triton_with(SMALL))


def test_no_tokens():
    p = make_linear_problem(0, 8, 37, seed=0, with_bias=True).leaves()
    logps, entropy = linear_logprobs(p.hidden, p.weight, p.targets, p.bias, 1.0, SMALL)
    assert logps.shape == entropy.shape == (0,)
    (logps.sum() + entropy.sum()).backward()
    assert p.hidden.grad.shape == (0, 8)
    assert not p.weight.grad.any() and not p.bias.grad.any()


def test_frozen_head_gets_no_weight_gradient_but_its_bias_does():
    p = make_linear_problem(9, 8, 45, seed=1, with_bias=True)
    hidden, bias = p.hidden.clone().requires_grad_(), p.bias.clone().requires_grad_()
    logps, entropy = linear_logprobs(hidden, p.weight, p.targets, bias, 1.3, SMALL)
    (logps.sum() + 0.5 * entropy.sum()).backward()
    assert p.weight.grad is None
    r_hidden, r_bias = p.hidden.clone().requires_grad_(), p.bias.clone().requires_grad_()
    r_logps, r_entropy = reference.linear_logprobs(
        r_hidden, p.weight, p.targets, bias=r_bias, temperature=1.3, return_entropy=True
    )
    (r_logps.sum() + 0.5 * r_entropy.sum()).backward()
    assert_close(hidden.grad, r_hidden.grad, 1e-10, "d_hidden")
    assert_close(bias.grad, r_bias.grad, 1e-10, "d_bias")


def test_tied_embedding_accumulates_both_gradients():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(45, 8).double()
    tokens, targets = torch.randint(0, 45, (2, 11)), torch.randint(0, 45, (22,))

    def grad_with(fn):
        emb.zero_grad()
        logps, _ = fn(torch.tanh(emb(tokens)).view(22, 8), emb.weight, targets)
        logps.sum().backward()
        return emb.weight.grad.clone()

    fused = grad_with(lambda h, w, t: linear_logprobs(h, w, t, None, 1.0, SMALL))
    plain = grad_with(lambda h, w, t: reference.linear_logprobs(h, w, t))
    assert_close(fused, plain, 1e-10, "tied weight grad")


def test_outputs_mutated_after_the_call_do_not_change_gradients():
    q = make_linear_problem(7, 6, 37, seed=2).leaves()
    logps, entropy = linear_logprobs(q.hidden, q.weight, q.targets, None, 1.0, SMALL)
    (logps.sum() + entropy.sum()).backward()
    first = (q.hidden.grad.clone(), q.weight.grad.clone())
    q.hidden.grad, q.weight.grad = None, None
    logps, entropy = linear_logprobs(q.hidden, q.weight, q.targets, None, 1.0, SMALL)
    loss = logps.sum() + entropy.sum()
    logps.detach().fill_(123.0)  # a caller scribbling on the outputs' storage
    entropy.detach().zero_()
    loss.backward()
    torch.testing.assert_close(q.hidden.grad, first[0], rtol=0, atol=0)
    torch.testing.assert_close(q.weight.grad, first[1], rtol=0, atol=0)


def test_gradcheck_float64():
    p = make_linear_problem(5, 4, 37, seed=7, with_bias=True, temperature=1.3).leaves()
    fn = lambda h, w, b: linear_logprobs(h, w, p.targets, b, p.temperature, SMALL)
    assert torch.autograd.gradcheck(fn, (p.hidden, p.weight, p.bias), fast_mode=True)
