"""Backend selection, the clear error without CUDA or the interpreter, and ``apo_loss`` on the Triton path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apo_kernels import APOConfig, apo_loss, fused_linear_logprobs, reference
from apo_kernels.inputs import check_backend
from tests.strategies import assert_close, make_linear_problem

# The interpreter evaluates masked lanes too (0 * -inf in discarded tile tails): numpy warns, results are unaffected.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

ROOT = Path(__file__).resolve().parents[2]


def test_auto_picks_torch_on_cpu_and_triton_on_cuda():
    assert check_backend("auto", torch.device("cpu")) == "torch"
    assert check_backend("auto", torch.device("cuda")) == "triton"


def test_triton_on_cpu_without_the_interpreter_raises_a_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch\n"
        "from apo_kernels import fused_linear_logprobs\n"
        "try:\n"
        "    fused_linear_logprobs(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long),"
        " backend='triton')\n"
        "except ValueError as e:\n"
        "    print('ValueError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ValueError: backend='triton' needs CUDA tensors (got cpu)" in out.stdout
    assert "TRITON_INTERPRET=1" in out.stdout


@pytest.mark.interpreter
def test_fused_linear_logprobs_triton_equals_torch_backend_with_leading_dims():
    p = make_linear_problem(12, 40, 1031, seed=3, with_bias=True, temperature=0.7)
    hidden, targets = p.hidden.view(3, 4, 40), p.targets.view(3, 4)
    got = fused_linear_logprobs(
        hidden, p.weight, targets, bias=p.bias, temperature=0.7, return_entropy=True, backend="triton"
    )
    want = fused_linear_logprobs(
        hidden, p.weight, targets, bias=p.bias, temperature=0.7, return_entropy=True, backend="torch"
    )
    for g, w in zip(got, want):
        assert g.shape == (3, 4)
        assert_close(g, w, 1e-12, "triton vs torch")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_apo_loss_triton_equals_torch_and_the_reference(dtype):
    B, T, D, V = 3, 7, 40, 1031
    p = make_linear_problem(
        B * T, D, V, seed=9, with_bias=True, temperature=1.3, profile="block_offsets", block=128, dtype=dtype
    )
    gen = torch.Generator().manual_seed(2)
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[1] = False  # a fully masked response
    targets = torch.where(mask, p.targets.view(B, T), torch.full_like(p.targets.view(B, T), -100))
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    old = torch.randn(B, T, generator=gen, dtype=out_dtype) * 0.3 - 6
    ref = torch.randn(B, T, generator=gen, dtype=out_dtype) * 0.3 - 6
    config = APOConfig(beta=0.04, entropy_coef=0.01, clip_ratio_c=3.0, temperature=1.3)
    advantages = torch.randn(B, generator=gen, dtype=out_dtype)

    def run(fn, **kw):
        q = p.leaves()
        out = fn(
            q.hidden.view(B, T, D),
            q.weight,
            targets,
            mask,
            advantages,
            old_logps=old,
            ref_logps=ref,
            bias=q.bias,
            config=config,
            **kw,
        )
        return (out.loss, out.logps, out.entropy, *torch.autograd.grad(out.loss, [q.hidden, q.weight, q.bias]))

    triton_path = run(apo_loss, backend="triton")
    torch_path = run(apo_loss, backend="torch")
    oracle = run(reference.apo_loss)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    names = ("loss", "logps", "entropy", "d_hidden", "d_weight", "d_bias")
    for name, t, c, o in zip(names, triton_path, torch_path, oracle):
        assert_close(t, o, tol, f"{name} vs reference")
        assert_close(t, c, tol, f"{name} vs torch backend")
    assert not triton_path[1][1].any() and not triton_path[3].view(B, T, D)[1].any()  # masked rows: zero
