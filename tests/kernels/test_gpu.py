"""Real-shape checks (Qwen2.5-VL-3B head: D = 2048, V = 151936) that only make sense compiled on a GPU.

Each GPU test has a CPU twin running the same check at interpreter-sized shapes.
"""

import pytest
import torch

from apo_kernels import driver
from apo_kernels.kernels import ROW_PASS, RowKernelParams, TritonRowPass
from apo_kernels.torch_backend import ROW_PASS as TORCH_ROW_PASS
from tests.strategies import assert_close, make_linear_problem, run_linear

# The interpreter evaluates masked lanes too (-inf * 0 in discarded lanes): numpy warns, results are unaffected.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; the interpreter twin runs on CPU")
QWEN_D, QWEN_V = 2048, 151936
TWIN_ROW_PASS = TritonRowPass(RowKernelParams(block=128, num_warps=1))


def check_against_torch_row_pass(n_tokens, hidden_size, vocab, device, row_pass, weight_dtype=torch.bfloat16):
    """Values and gradients of bf16 inputs, Triton row pass against the torch row pass (same driver)."""
    problem = make_linear_problem(n_tokens, hidden_size, vocab, seed=0, with_bias=False, temperature=0.7,
                                  dtype=torch.float32)
    problem = problem.astype(torch.bfloat16, weight_dtype)
    on = lambda x: None if x is None else x.to(device)  # noqa: E731
    problem = problem.__class__(on(problem.hidden), on(problem.weight), on(problem.targets), None, 0.7, "normal")
    run = lambda rp: run_linear(problem, lambda p: driver.linear_logprobs(  # noqa: E731
        p.hidden, p.weight, p.targets, p.bias, p.temperature, row_pass=rp))
    for name, g, w in zip(("logps", "entropy", "d_hidden", "d_weight"), run(row_pass), run(TORCH_ROW_PASS)):
        assert g.dtype == w.dtype
        assert_close(g, w, 2e-2 if name.startswith("d_") else 1e-5, name)


@requires_cuda
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_qwen_shape_matches_the_torch_row_pass(weight_dtype):
    check_against_torch_row_pass(4096, QWEN_D, QWEN_V, "cuda", ROW_PASS, weight_dtype=weight_dtype)


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_qwen_shape_matches_the_torch_row_pass_interpreter_twin(weight_dtype):
    check_against_torch_row_pass(40, 72, 1031, "cpu", TWIN_ROW_PASS, weight_dtype=weight_dtype)


def extra_peak_bytes(n_tokens, hidden_size, vocab, device):
    """Peak memory of forward + backward beyond the inputs and their gradients."""
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n_tokens, hidden_size, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device=device, dtype=torch.bfloat16, generator=gen) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (n_tokens,), device=device, generator=gen)
    grads_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    logps, entropy = driver.linear_logprobs(hidden, weight, targets, None, 1.0, row_pass=ROW_PASS, workspace_bytes=2**30)
    (logps.sum() + 0.01 * entropy.sum()).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base - grads_bytes


@requires_cuda
def test_peak_memory_at_32k_tokens_on_the_qwen_shape_follows_the_formula():
    extra = extra_peak_bytes(32768, QWEN_D, QWEN_V, "cuda")
    bound = driver.extra_memory_bytes(32768, QWEN_D, driver.plan_tile(32768, QWEN_V, 6, 2**30), 6)
    assert extra <= 1.05 * bound, f"{extra / 2**20:.1f} MiB above inputs and gradients, formula {bound / 2**20:.1f} MiB"


@requires_cuda
def test_262144_tokens_need_no_grid_dimension_beyond_the_limits():
    check_against_torch_row_pass(262144, 64, 1031, "cuda", ROW_PASS)


@requires_cuda
def test_float64_on_cuda_matches_the_cpu_torch_row_pass():
    p = make_linear_problem(9, 16, 300, seed=1, with_bias=True)
    cuda = p.__class__(p.hidden.cuda(), p.weight.cuda(), p.targets.cuda(), p.bias.cuda(), 1.0, "normal")
    logps, entropy = driver.linear_logprobs(cuda.hidden, cuda.weight, cuda.targets, cuda.bias, 1.0, row_pass=ROW_PASS)
    want = driver.linear_logprobs(p.hidden, p.weight, p.targets, p.bias, 1.0, row_pass=TORCH_ROW_PASS)
    assert logps.dtype == torch.float64
    assert_close(logps.cpu(), want[0], 1e-12, "logps")
    assert_close(entropy.cpu(), want[1], 1e-12, "entropy")


def check_one_pass_against_two_passes(n_tokens, hidden_size, vocab, device):
    """apo_loss in one pass and in two, bf16 inputs, the Triton row pass and epilogue: the same loss, log-probs
    and gradients (up to the matmuls' rounding: bf16 bounds for the gradients)."""
    from apo_kernels import APOConfig, apo_loss

    problem = make_linear_problem(n_tokens, hidden_size, vocab, seed=2, temperature=0.7, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    groups = 8
    shape = (groups, n_tokens // groups)
    advantages = torch.randn(groups, generator=gen).to(device)
    ref = (torch.randn(shape, generator=gen) * 0.1 - 12).to(device)
    config = APOConfig(beta=0.04, entropy_coef=0.01, temperature=0.7)

    def run(sweep):
        hidden = problem.hidden.to(device, torch.bfloat16).view(*shape, -1).requires_grad_()
        weight = problem.weight.to(device, torch.bfloat16).requires_grad_()
        out = apo_loss(hidden, weight, problem.targets.to(device).view(shape), torch.ones(shape, device=device),
                       advantages, ref_logps=ref, old_logps=ref, config=config, backend="triton", sweep=sweep)
        out.loss.backward()
        return out, hidden.grad, weight.grad

    one, one_dh, one_dw = run("one-pass")
    two, two_dh, two_dw = run("two-pass")
    assert one.metrics["one_pass"] == 1 and two.metrics["one_pass"] == 0
    assert_close(one.loss, two.loss, 1e-5, "loss")
    assert_close(one.logps, two.logps, 1e-5, "logps")
    assert one_dh.dtype == one_dw.dtype == torch.bfloat16
    assert_close(one_dh, two_dh, 2e-2, "d_hidden")
    assert_close(one_dw, two_dw, 2e-2, "d_weight")


@requires_cuda
def test_one_pass_at_the_qwen_shape_matches_two_passes():
    check_one_pass_against_two_passes(4096, QWEN_D, QWEN_V, "cuda")


def test_one_pass_at_the_qwen_shape_matches_two_passes_interpreter_twin():
    check_one_pass_against_two_passes(48, 72, 1031, "cpu")
