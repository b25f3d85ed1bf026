"""The plan stage: made once per call, on the rows the sweep visits."""

import pytest
import torch

from apo_kernels import APOConfig, apo_loss, plan
from apo_kernels.torch_backend import ROW_PASS as TORCH_ROW_PASS

BATCH, LENGTH, HIDDEN, VOCAB = 4, 25, 8, 300


def _masked(valid_per_sequence: int):
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
    mask[:, :valid_per_sequence] = True
    return dict(
        hidden=torch.randn(BATCH, LENGTH, HIDDEN, generator=gen, requires_grad=True),
        weight=torch.randn(VOCAB, HIDDEN, generator=gen, requires_grad=True),
        targets=torch.randint(0, VOCAB, (BATCH, LENGTH), generator=gen),
        mask=mask,
        advantages=torch.randn(BATCH, generator=gen),
        config=APOConfig(beta=0.0),
    )


def test_the_one_pass_plan_counts_only_the_swept_rows():
    """20 valid tokens of 100: a workspace that holds a one-pass chunk of the 20 takes one pass by itself, although
    20 is below ONE_PASS_MIN_ROWS: the chunk holds every swept row. Planned on all 100 rows it would not."""
    kwargs = _masked(5)
    hidden, weight = kwargs["hidden"].view(-1, HIDDEN), kwargs["weight"]
    for_rows = lambda n, budget: plan.plan_sweep(  # one-pass plan of n rows
        "auto", hidden, weight, None, TORCH_ROW_PASS, budget, needs_grad=(True, True), n_tokens=n
    )
    budget = for_rows(20, 10**9).extra_bytes  # exactly one chunk of the 20 swept rows
    assert 20 < plan.ONE_PASS_MIN_ROWS["cpu"] and for_rows(20, budget).one_pass
    assert not for_rows(100, budget).one_pass  # what planning on every row decided
    out = apo_loss(**kwargs, workspace_bytes=budget)
    assert out.metrics["one_pass"] == 1


@pytest.mark.parametrize("sweep", ["one-pass", "two-pass"])
def test_a_call_plans_once(monkeypatch, sweep):
    calls = []
    planned = plan.plan_sweep
    monkeypatch.setattr(plan, "plan_sweep", lambda *args, **kwargs: calls.append(kwargs) or planned(*args, **kwargs))
    out = apo_loss(**_masked(7), sweep=sweep)
    out.loss.backward()
    assert len(calls) == 1 and calls[0]["n_tokens"] == BATCH * 7
