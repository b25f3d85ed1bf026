"""Real-shape checks (Qwen2.5-VL-3B head: D = 2048, V = 151936) that only make sense compiled on a GPU.

Each GPU test (marked ``cuda``) has a CPU twin (marked ``interpreter``) running the same check at
interpreter-sized shapes; tests/conftest.py skips each kind where it cannot run. The last tests hold
``pytest tests/kernels`` to that on a GPU and the test helper to the log-probs' device.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apo_kernels import APOConfig, apo_loss, plan
from apo_kernels.kernels import ROW_PASS, RowKernelParams, TritonRowPass
from apo_kernels.torch_backend import ROW_PASS as TORCH_ROW_PASS
from tests.strategies import (
    assert_close,
    assert_compiled_matches_eager,
    driver_logprobs,
    make_linear_problem,
    run_linear,
)

# The interpreter evaluates masked lanes too (-inf * 0 in discarded lanes): numpy warns, results are unaffected.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

ROOT = Path(__file__).resolve().parents[2]
QWEN_D, QWEN_V = 2048, 151936
TWIN_ROW_PASS = TritonRowPass(RowKernelParams(block=128, num_warps=1))
GROUPS = 8  # responses per apo_loss batch


def check_against_torch_row_pass(n_tokens, hidden_size, vocab, device, row_pass, weight_dtype=torch.bfloat16):
    """Values and gradients of bf16 inputs, Triton row pass against the torch row pass (same driver)."""
    problem = make_linear_problem(
        n_tokens, hidden_size, vocab, seed=0, with_bias=False, temperature=0.7, dtype=torch.float32
    )
    problem = problem.astype(torch.bfloat16, weight_dtype).to(device)
    run = lambda rp: run_linear(
        problem,
        lambda p: driver_logprobs(p.hidden, p.weight, p.targets, p.bias, p.temperature, row_pass=rp),
    )
    for name, g, w in zip(("logps", "entropy", "d_hidden", "d_weight"), run(row_pass), run(TORCH_ROW_PASS)):
        assert g.dtype == w.dtype
        assert_close(g, w, 2e-2 if name.startswith("d_") else 1e-5, name)


@pytest.mark.cuda
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_qwen_shape_matches_the_torch_row_pass(weight_dtype):
    check_against_torch_row_pass(4096, QWEN_D, QWEN_V, "cuda", ROW_PASS, weight_dtype=weight_dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_qwen_shape_matches_the_torch_row_pass_interpreter_twin(weight_dtype):
    check_against_torch_row_pass(40, 72, 1031, "cpu", TWIN_ROW_PASS, weight_dtype=weight_dtype)


def extra_peak_bytes(n_tokens, hidden_size, vocab, device):
    """Peak memory of forward + backward beyond the inputs and their gradients."""
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n_tokens, hidden_size, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    weight = (
        torch.randn(vocab, hidden_size, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
    ).requires_grad_()
    targets = torch.randint(0, vocab, (n_tokens,), device=device, generator=gen)
    grads_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    logps, entropy = driver_logprobs(hidden, weight, targets, None, 1.0, row_pass=ROW_PASS, workspace_bytes=2**30)
    (logps.sum() + 0.01 * entropy.sum()).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base - grads_bytes


def planned_extra_bytes(n_tokens, hidden_size, vocab, workspace_bytes):
    """What the planner sets aside for a bf16 two-pass sweep with both gradients (meta tensors: no memory)."""
    hidden = torch.empty(n_tokens, hidden_size, dtype=torch.bfloat16, device="meta")
    weight = torch.empty(vocab, hidden_size, dtype=torch.bfloat16, device="meta")
    return plan.plan_sweep(
        "two-pass", hidden, weight, None, ROW_PASS, workspace_bytes, needs_grad=(True, True)
    ).extra_bytes


@pytest.mark.cuda
def test_peak_memory_at_32k_tokens_on_the_qwen_shape_follows_the_formula():
    extra = extra_peak_bytes(32768, QWEN_D, QWEN_V, "cuda")
    bound = planned_extra_bytes(32768, QWEN_D, QWEN_V, 2**30)
    assert extra <= 1.05 * bound, f"{extra / 2**20:.1f} MiB above inputs and gradients, formula {bound / 2**20:.1f} MiB"


@pytest.mark.cuda
def test_262144_tokens_need_no_grid_dimension_beyond_the_limits():
    check_against_torch_row_pass(262144, 64, 1031, "cuda", ROW_PASS)


@pytest.mark.cuda
def test_float64_on_cuda_matches_the_cpu_torch_row_pass():
    p = make_linear_problem(9, 16, 300, seed=1, with_bias=True)
    cuda = p.to("cuda")
    logps, entropy = driver_logprobs(cuda.hidden, cuda.weight, cuda.targets, cuda.bias, 1.0, row_pass=ROW_PASS)
    want = driver_logprobs(p.hidden, p.weight, p.targets, p.bias, 1.0, row_pass=TORCH_ROW_PASS)
    assert logps.dtype == torch.float64
    assert_close(logps.cpu(), want[0], 1e-12, "logps")
    assert_close(entropy.cpu(), want[1], 1e-12, "entropy")


def bf16_problem(n_tokens, hidden_size, vocab, device):
    return (
        make_linear_problem(n_tokens, hidden_size, vocab, seed=2, temperature=0.7, dtype=torch.float32)
        .astype(torch.bfloat16)
        .to(device)
    )


def apo_step(problem, sweep):
    """``(hidden, weight) -> apo_loss(...)`` on ``problem``'s targets as 8 responses, with the Triton row pass
    and epilogue on ``problem``'s device."""
    device = problem.hidden.device
    shape = (GROUPS, problem.targets.numel() // GROUPS)
    gen = torch.Generator().manual_seed(3)
    advantages = torch.randn(GROUPS, generator=gen).to(device)
    ref = (torch.randn(shape, generator=gen) * 0.1 - 12).to(device)
    targets, mask = problem.targets.view(shape), torch.ones(shape, device=device)
    config = APOConfig(beta=0.04, entropy_coef=0.01, temperature=0.7)
    return lambda hidden, weight: apo_loss(
        hidden.view(*shape, -1),
        weight,
        targets,
        mask,
        advantages,
        ref_logps=ref,
        old_logps=ref,
        config=config,
        backend="triton",
        sweep=sweep,
    )


def check_one_pass_against_two_passes(n_tokens, hidden_size, vocab, device):
    """apo_loss in one pass and in two, bf16 inputs, the Triton row pass and epilogue: the same loss, log-probs
    and gradients (up to the matmuls' rounding: bf16 bounds for the gradients)."""
    problem = bf16_problem(n_tokens, hidden_size, vocab, device)

    def run(sweep):
        q = problem.leaves()
        out = apo_step(problem, sweep)(q.hidden, q.weight)
        out.loss.backward()
        return out, q.hidden.grad, q.weight.grad

    one, one_dh, one_dw = run("one-pass")
    two, two_dh, two_dw = run("two-pass")
    assert one.metrics["one_pass"] == 1 and two.metrics["one_pass"] == 0
    assert_close(one.loss, two.loss, 1e-5, "loss")
    assert_close(one.logps, two.logps, 1e-5, "logps")
    assert one_dh.dtype == one_dw.dtype == torch.bfloat16
    assert_close(one_dh, two_dh, 2e-2, "d_hidden")
    assert_close(one_dw, two_dw, 2e-2, "d_weight")


@pytest.mark.cuda
def test_one_pass_at_the_qwen_shape_matches_two_passes():
    check_one_pass_against_two_passes(4096, QWEN_D, QWEN_V, "cuda")


@pytest.mark.interpreter
def test_one_pass_at_the_qwen_shape_matches_two_passes_interpreter_twin():
    check_one_pass_against_two_passes(48, 72, 1031, "cpu")


def check_compiled_apo_loss(n_tokens, hidden_size, vocab, device, sweep):
    """``torch.compile(fullgraph=True)`` of an apo_loss step equals eager, gradients included. On CUDA the graph
    traces the bf16 matmuls as ``addmm(out_dtype=float32, out=...)`` and the Triton ops through their fakes,
    which CPU runs never trace (they upcast the operands). ``aot_eager``: fake propagation and
    functionalization, where that path can break, without inductor's minutes of compilation (benchmarks/
    gpu_first_check.py compiles one call with inductor)."""
    torch._dynamo.reset()
    problem = bf16_problem(n_tokens, hidden_size, vocab, device)
    step = apo_step(problem, sweep)
    assert_compiled_matches_eager(lambda hidden, weight: step(hidden, weight).loss, problem, fullgraph=True)


@pytest.mark.cuda
@pytest.mark.parametrize("sweep", ["one-pass", "two-pass"])
def test_compiled_apo_loss_at_the_qwen_shape_matches_eager(sweep):
    check_compiled_apo_loss(1024, QWEN_D, QWEN_V, "cuda", sweep)


@pytest.mark.interpreter
@pytest.mark.parametrize("sweep", ["one-pass", "two-pass"])
def test_compiled_apo_loss_at_the_qwen_shape_matches_eager_interpreter_twin(sweep):
    check_compiled_apo_loss(48, 72, 1031, "cpu", sweep)


def test_run_linear_draws_its_cotangents_on_the_log_probs_device():
    """The CUDA tests' helper: log-probs on another device than the CPU generator's (``meta`` here) get
    cotangents there, and gradients of the inputs' shapes."""
    problem = make_linear_problem(6, 4, 10, seed=0).to("meta")

    def on_meta(p):
        logits = p.hidden @ p.weight.T
        return logits.logsumexp(-1), logits.mean(-1)

    logps, _entropy, d_hidden, d_weight = run_linear(problem, on_meta)
    assert logps.device.type == d_hidden.device.type == "meta"
    assert d_hidden.shape == (6, 4) and d_weight.shape == (10, 4)


# Tests in tests/kernels that launch no Triton kernel on CPU tensors: they pass with CUDA and without.
RUN_ANYWHERE = {
    "tests/kernels/test_dispatch.py::test_auto_picks_torch_on_cpu_and_triton_on_cuda",
    "tests/kernels/test_dispatch.py::test_triton_on_cpu_without_the_interpreter_raises_a_clear_error",
    "tests/kernels/test_gpu.py::test_run_linear_draws_its_cotangents_on_the_log_probs_device",
    "tests/kernels/test_gpu.py::test_every_kernel_test_is_marked_cuda_or_interpreter",
}


def test_every_kernel_test_is_marked_cuda_or_interpreter():
    """On a GPU the interpreter is off, so a test that runs Triton on CPU tensors would compile real kernels and
    launch them on host pointers: ``pytest tests/kernels`` there must run only the CUDA tests and skip the
    interpreter ones. Collection only."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "not cuda and not interpreter",
            "tests/kernels",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode in (0, 5), out.stdout[-3000:] + out.stderr[-3000:]  # 5: every test deselected
    unmarked = {line for line in out.stdout.splitlines() if "::" in line}
    assert unmarked, out.stdout[-3000:]  # the run-anywhere tests, this one included
    assert unmarked <= RUN_ANYWHERE, f"mark these cuda or interpreter: {sorted(unmarked - RUN_ANYWHERE)}"
