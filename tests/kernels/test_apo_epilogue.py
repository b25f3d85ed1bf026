"""The Triton epilogue against the shared torch objective: the per-token formula cannot drift."""

import itertools

import pytest
import torch

from apo_kernels import APOConfig, apo_objective
from apo_kernels.kernels import apo_epilogue
from apo_kernels.objective import torch_epilogue

pytestmark = pytest.mark.interpreter  # the Triton epilogue on CPU tensors

B, T = 5, 13
EPS = {torch.float32: 1e-6, torch.float64: 1e-14}


def random_case(dtype, seed, B=B, T=T):
    """Epilogue inputs as apo_objective builds them: expanded per-sequence advantages, a transposed
    (non-contiguous) ratio input, random non-negative aggregation weights with zeros (masked tokens)."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    logps = randn(B, T) - 2.0
    # Ratios inside and outside both clip ranges and beyond the dual-clip cap (log 3 ~ 1.1).
    old = (logps + 0.8 * randn(B, T)).T.contiguous().T
    old[0, :3] = logps[0, :3]  # ratio exactly 1 (the one-update case): ties of the clipped min
    ref = logps + 0.5 * randn(B, T)
    advantages = randn(B, 1).expand(B, T)
    keep = torch.rand(B, T, generator=gen) > 0.2
    w_pg = torch.rand(B, T, generator=gen, dtype=dtype) * keep
    w_kl = torch.rand(B, T, generator=gen, dtype=dtype) * keep
    entropy = torch.rand(B, T, generator=gen, dtype=dtype) * 3
    return logps, entropy, old, ref, advantages, w_pg, w_kl


def run(epilogue, case, config):
    logps, entropy, *rest = case
    logps, entropy = logps.clone().requires_grad_(), entropy.clone().requires_grad_()
    out = epilogue(logps, entropy, *rest, config)
    d_logps, d_entropy = torch.autograd.grad(3.0 * out.loss, (logps, entropy), allow_unused=True)
    return out, d_logps, torch.zeros_like(entropy) if d_entropy is None else d_entropy


def test_sequences_longer_than_a_block():
    """Several column blocks per sequence (BLOCK = 512), the last one partial: every token is computed once."""
    case = random_case(torch.float64, 7, B=2, T=1100)
    config = APOConfig(beta=0.04, entropy_coef=0.01)
    got, d_logps, d_entropy = run(apo_epilogue, case, config)
    want, want_d_logps, want_d_entropy = run(torch_epilogue, case, config)
    assert_rounding_close(got.loss, want.loss, 2 * 1100 * EPS[torch.float64], "loss")
    for name in ("pg", "kl", "ratio"):
        assert_rounding_close(getattr(got, name), getattr(want, name), EPS[torch.float64], name)
    assert_rounding_close(d_logps, want_d_logps, EPS[torch.float64], "dL/dlogp")
    assert_rounding_close(d_entropy, want_d_entropy, EPS[torch.float64], "dL/dentropy")


def assert_rounding_close(actual, expected, eps, what):
    """Equal up to a few roundings of the largest term involved."""
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=8 * eps, atol=8 * eps * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "kl_estimator, policy, entropy_coef",
    list(itertools.product(["k1", "k2", "k3"], ["ppo", "ppo dual-clip", "ppo two-sided", "cispo", "sapo", "vespo",
                                                "dro", "dppo_tv", "dppo_kl dual-clip"], [0.0, 0.01])),
)
def test_matches_torch_epilogue(dtype, kl_estimator, policy, entropy_coef):
    config = APOConfig(kl_estimator=kl_estimator, policy_loss=policy.split()[0],
                       clip_ratio_c=3.0 if "dual" in policy else None, ratio_cap=1.3 if "two" in policy else None,
                       sapo_tau_pos=1.5, sapo_tau_neg=0.8, vespo_k_pos=1.5, vespo_lambda_pos=2.5,
                       vespo_k_neg=2.5, vespo_lambda_neg=1.5, dro_beta=0.7 if policy == "dro" else None,
                       entropy_coef=entropy_coef,
                       eps_low=0.2, eps_high=0.28, beta=0.04)
    for seed in range(3):
        case = random_case(dtype, seed)
        got, d_logps, d_entropy = run(apo_epilogue, case, config)
        want, want_d_logps, want_d_entropy = run(torch_epilogue, case, config)
        eps = EPS[dtype]
        assert got.loss.dtype == dtype and got.loss.shape == ()
        # The loss is a sum of B * T terms in another order: rounding grows with their count.
        assert_rounding_close(got.loss, want.loss, B * T * eps, "loss")
        for name in ("pg", "kl", "ratio"):
            assert not getattr(got, name).requires_grad
            assert_rounding_close(getattr(got, name), getattr(want, name), eps, name)
        assert_rounding_close(d_logps, want_d_logps, eps, "dL/dlogp")
        assert_rounding_close(d_entropy, want_d_entropy, eps, "dL/dentropy")
        if entropy_coef:
            assert d_entropy.abs().sum() > 0


def test_objective_with_the_triton_epilogue_equals_the_torch_one():
    gen = torch.Generator().manual_seed(0)
    logps = torch.randn(4, 9, generator=gen, dtype=torch.float64) - 1
    mask = torch.rand(4, 9, generator=gen) > 0.3
    mask[2] = False  # a fully masked sequence
    old = logps + 0.3 * torch.randn(4, 9, generator=gen, dtype=torch.float64)
    ref = logps + 0.3 * torch.randn(4, 9, generator=gen, dtype=torch.float64)
    entropy = torch.rand(4, 9, generator=gen, dtype=torch.float64)
    kw = dict(entropy=entropy, kl_weights=torch.rand(4, dtype=torch.float64, generator=gen), old_logps=old,
              ref_logps=ref, config=APOConfig(beta=0.1, clip_ratio_c=3.0, entropy_coef=0.01,
                                              loss_agg_mode="seq-mean-token-sum-norm"))
    results = []
    for epilogue in (apo_epilogue, torch_epilogue):
        x = logps.clone().requires_grad_()
        loss, metrics = apo_objective(x, mask, torch.randn(4, generator=torch.Generator().manual_seed(1),
                                                           dtype=torch.float64), epilogue=epilogue, **kw)
        results.append((loss, torch.autograd.grad(loss, x)[0], metrics))
    (loss, grad, metrics), (want_loss, want_grad, want_metrics) = results
    torch.testing.assert_close(loss, want_loss, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad, want_grad, rtol=1e-13, atol=1e-15)
    assert metrics.keys() == want_metrics.keys()
    for key in metrics:
        torch.testing.assert_close(metrics[key], want_metrics[key], rtol=1e-13, atol=1e-15)


def test_outputs_mutated_after_the_call_do_not_change_gradients():
    case = random_case(torch.float64, 4)
    config = APOConfig(entropy_coef=0.01)
    _, d_logps, d_entropy = run(apo_epilogue, case, config)
    logps, entropy = case[0].clone().requires_grad_(), case[1].clone().requires_grad_()
    out = apo_epilogue(logps, entropy, *case[2:], config)
    for x in (out.pg, out.kl, out.ratio):
        x.fill_(7.0)
    again = torch.autograd.grad(3.0 * out.loss, (logps, entropy))
    torch.testing.assert_close(again[0], d_logps, rtol=0, atol=0)
    torch.testing.assert_close(again[1], d_entropy, rtol=0, atol=0)


def test_empty_batch():
    empty = torch.zeros(0, 4, dtype=torch.float32)
    logps = empty.clone().requires_grad_()
    out = apo_epilogue(logps, None, empty, empty, empty, empty, empty, APOConfig())
    assert out.loss.item() == 0 and out.pg.shape == (0, 4)
    assert torch.autograd.grad(out.loss, logps)[0].shape == (0, 4)
