"""Real-shape checks (Qwen2.5-VL-3B head: D = 2048, V = 151936) that only make sense compiled on a GPU.

Each GPU test has a CPU twin running the same check at interpreter-sized shapes.
"""

import pytest
import torch

from apo_kernels import torch_backend
from apo_kernels.kernels import TileConfig, linear_logprobs
from tests.strategies import assert_close, make_linear_problem, run_linear

# The interpreter evaluates masked lanes too (0 * -inf in discarded tile tails): numpy warns, results are unaffected.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; the interpreter twin runs on CPU")
QWEN_D, QWEN_V = 2048, 151936
TWIN_TILES = TileConfig(block_n=16, block_v=128, block_d=32, num_warps=1, num_stages=1, scratch_bytes=8192)


def check_against_torch_backend(n_tokens, hidden_size, vocab, device, tiles=None, weight_dtype=torch.bfloat16):
    """Values and gradients of bf16 inputs against the chunked torch backend (float32 compute)."""
    problem = make_linear_problem(n_tokens, hidden_size, vocab, seed=0, with_bias=False, temperature=0.7,
                                  dtype=torch.float32)
    problem = problem.astype(torch.bfloat16, weight_dtype)
    on = lambda x: None if x is None else x.to(device)  # noqa: E731
    problem = problem.__class__(on(problem.hidden), on(problem.weight), on(problem.targets), None, 0.7, "normal")
    kw = {} if tiles is None else {"tiles": tiles}
    got = run_linear(problem, lambda p: linear_logprobs(p.hidden, p.weight, p.targets, p.bias, p.temperature, **kw))
    want = run_linear(problem, lambda p: torch_backend.linear_logprobs(p.hidden, p.weight, p.targets, p.bias,
                                                                       p.temperature))
    for name, g, w in zip(("logps", "entropy", "d_hidden", "d_weight"), got, want):
        assert g.dtype == w.dtype
        assert_close(g, w, 2e-2 if name.startswith("d_") else 1e-4, name)


@requires_cuda
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_qwen_shape_matches_the_torch_backend(weight_dtype):
    check_against_torch_backend(4096, QWEN_D, QWEN_V, "cuda", weight_dtype=weight_dtype)


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_qwen_shape_matches_the_torch_backend_interpreter_twin(weight_dtype):
    check_against_torch_backend(40, 72, 1031, "cpu", tiles=TWIN_TILES, weight_dtype=weight_dtype)


def extra_peak_bytes(n_tokens, hidden_size, vocab, device, tiles=None):
    """Peak memory of forward + backward beyond the inputs and their gradients."""
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n_tokens, hidden_size, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device=device, dtype=torch.bfloat16, generator=gen) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (n_tokens,), device=device, generator=gen)
    grads_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    kw = {} if tiles is None else {"tiles": tiles}
    logps, entropy = linear_logprobs(hidden, weight, targets, None, 1.0, **kw)
    (logps.sum() + 0.01 * entropy.sum()).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base - grads_bytes


@requires_cuda
def test_peak_memory_at_32k_tokens_on_the_qwen_shape_is_under_64_mib():
    extra = extra_peak_bytes(32768, QWEN_D, QWEN_V, "cuda")
    assert extra < 64 * 2**20, f"{extra / 2**20:.1f} MiB above inputs and gradients"


@requires_cuda
def test_262144_tokens_need_no_grid_dimension_beyond_the_limits():
    check_against_torch_backend(262144, 64, 1031, "cuda")


@requires_cuda
def test_float64_on_cuda_is_delegated_to_the_torch_backend():
    p = make_linear_problem(9, 16, 300, seed=1, with_bias=True)
    cuda = p.__class__(p.hidden.cuda(), p.weight.cuda(), p.targets.cuda(), p.bias.cuda(), 1.0, "normal")
    logps, entropy = linear_logprobs(cuda.hidden, cuda.weight, cuda.targets, cuda.bias, 1.0)
    want = torch_backend.linear_logprobs(p.hidden, p.weight, p.targets, p.bias, 1.0)
    assert logps.dtype == torch.float64
    assert_close(logps.cpu(), want[0], 1e-12, "logps")
    assert_close(entropy.cpu(), want[1], 1e-12, "entropy")
