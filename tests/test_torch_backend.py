"""The slab driver with the torch row pass against the materialized-logits oracle (float64), tiles forced small."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from apo_kernels import fused_linear_logprobs, reference
from apo_kernels import plan
from apo_kernels.torch_backend import ROW_PASS
from tests.strategies import (
    assert_close,
    assert_compiled_matches_eager,
    assert_matches_oracle,
    driver_logprobs,
    linear_problems,
    make_linear_problem,
    tiled,
)


def chunked(token_chunk, vocab_chunk):
    return tiled(ROW_PASS, token_chunk, vocab_chunk)


def linear_logprobs(hidden, weight, targets, bias=None, temperature=1.0, *, token_chunk, vocab_chunk):
    return driver_logprobs(
        hidden, weight, targets, bias, temperature, row_pass=ROW_PASS, tile=plan.Tile(token_chunk, vocab_chunk)
    )


@settings(max_examples=400)
@given(
    problem=linear_problems(),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
    token_chunk=st.integers(1, 9),
    vocab_chunk=st.integers(4, 40),
)
def test_values_and_gradients_match_the_float64_oracle(problem, dtype, token_chunk, vocab_chunk):
    assert_matches_oracle(problem.astype(dtype), chunked(token_chunk, vocab_chunk))


@pytest.mark.parametrize("profile", ["block_offsets", "all_negative", "peaked"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_extreme_logits_at_a_real_vocab_tail(profile, dtype):
    problem = make_linear_problem(33, 40, 1031, seed=3, profile=profile, temperature=0.7, block=128, dtype=dtype)
    assert_matches_oracle(problem, chunked(8, 128))


def test_mixed_dtypes_and_non_contiguous_inputs():
    problem = make_linear_problem(11, 24, 97, seed=5, with_bias=True, dtype=torch.float64)
    hidden = problem.hidden.to(torch.bfloat16).T.contiguous().T  # non-contiguous view of the same values
    weight = torch.cat([problem.weight, problem.weight], dim=1)[:, ::2]  # strided
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    logps, entropy = fused_linear_logprobs(hidden, weight, problem.targets, bias=problem.bias, return_entropy=True)
    ref_logps, ref_entropy = reference.linear_logprobs(
        hidden.double(), weight.double(), problem.targets, bias=problem.bias, return_entropy=True
    )
    assert logps.dtype == torch.float64  # the float64 head sets the compute dtype
    assert_close(logps, ref_logps, 1e-10, "logps")
    assert_close(entropy, ref_entropy, 1e-10, "entropy")


def test_gradcheck_float64():
    p = make_linear_problem(5, 4, 11, seed=7, with_bias=True, temperature=1.3).leaves()
    fn = lambda h, w, b: linear_logprobs(h, w, p.targets, b, p.temperature, token_chunk=2, vocab_chunk=3)
    assert torch.autograd.gradcheck(fn, (p.hidden, p.weight, p.bias))


def test_frozen_head_gets_no_weight_gradient():
    p = make_linear_problem(6, 8, 30, seed=1, dtype=torch.float32)
    hidden = p.hidden.clone().requires_grad_()
    logps, _ = fused_linear_logprobs(hidden, p.weight, p.targets)
    logps.sum().backward()
    assert hidden.grad is not None and p.weight.grad is None


def test_tied_embedding_accumulates_both_gradients():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(29, 8).double()
    tokens = torch.randint(0, 29, (2, 5))
    targets = torch.randint(0, 29, (2, 5))

    def loss_with(fn):
        emb.zero_grad()
        hidden = torch.tanh(emb(tokens))
        logps, _ = fn(hidden, emb.weight, targets)
        logps.sum().backward()
        return emb.weight.grad.clone()

    fused = loss_with(lambda h, w, t: fused_linear_logprobs(h, w, t))
    plain = loss_with(lambda h, w, t: reference.linear_logprobs(h, w, t))
    assert_close(fused, plain, 1e-10, "tied weight grad")


def test_outputs_mutated_after_the_call_do_not_change_gradients():
    q = make_linear_problem(7, 6, 19, seed=2).leaves()
    logps, entropy = linear_logprobs(q.hidden, q.weight, q.targets, token_chunk=3, vocab_chunk=5)
    (logps.sum() + entropy.sum()).backward(inputs=[q.hidden, q.weight])
    first = (q.hidden.grad.clone(), q.weight.grad.clone())
    q.hidden.grad, q.weight.grad = None, None
    logps2, entropy2 = linear_logprobs(q.hidden, q.weight, q.targets, token_chunk=3, vocab_chunk=5)
    loss = logps2.sum() + entropy2.sum()
    logps2.detach().fill_(123.0)  # a caller scribbling on the outputs' storage
    entropy2.detach().zero_()
    loss.backward()
    torch.testing.assert_close(q.hidden.grad, first[0])
    torch.testing.assert_close(q.weight.grad, first[1])


def test_shapes_broadcast_over_leading_dims():
    p = make_linear_problem(12, 5, 17, seed=4)
    logps, entropy = fused_linear_logprobs(p.hidden.view(3, 4, 5), p.weight, p.targets.view(3, 4), return_entropy=True)
    assert logps.shape == entropy.shape == (3, 4)
    flat, _ = fused_linear_logprobs(p.hidden, p.weight, p.targets)
    torch.testing.assert_close(logps.reshape(-1), flat)
    assert fused_linear_logprobs(p.hidden, p.weight, p.targets)[1] is None


def test_torch_compile_fullgraph_matches_eager():
    p = make_linear_problem(9, 8, 23, seed=8, dtype=torch.float32)

    def loss_fn(h, w):
        logps, entropy = linear_logprobs(h, w, p.targets, None, 1.0, token_chunk=4, vocab_chunk=8)
        return logps.sum() + 0.1 * entropy.sum()

    assert_compiled_matches_eager(loss_fn, p, fullgraph=True)


def test_masked_positions_are_skipped_and_come_back_zero():
    p = make_linear_problem(12, 6, 29, seed=9).leaves()
    mask = torch.tensor([True, False, True, True, False, False, True, True, True, False, True, True]).view(3, 4)
    targets = torch.where(mask, p.targets.view(3, 4), -100)  # masked ids may be anything
    logps, entropy = fused_linear_logprobs(p.hidden.view(3, 4, 6), p.weight, targets, mask=mask, return_entropy=True)
    full_logps, full_entropy = reference.linear_logprobs(p.hidden, p.weight, p.targets, return_entropy=True)
    torch.testing.assert_close(logps[mask], full_logps.view(3, 4)[mask])
    torch.testing.assert_close(entropy[mask], full_entropy.view(3, 4)[mask])
    assert torch.all(logps[~mask] == 0) and torch.all(entropy[~mask] == 0)
    logps.sum().backward()
    assert torch.all(p.hidden.grad.view(3, 4, 6)[~mask] == 0)
    with pytest.raises(ValueError, match=r"mask must have shape hidden.shape\[:-1\]"):
        fused_linear_logprobs(p.hidden, p.weight, p.targets, mask=mask)
