"""``hidden`` goes one way through the core: inputs, plan, driver, back to the entry (issue 23's bounds: through
``apo_loss`` at most 8 stays and 3 returns, through ``fused_linear_logprobs`` at most 5 and 1)."""

import pytest
import torch

from apo_kernels import APOConfig, apo_loss, fused_linear_logprobs
from tests.data_path import count, trace


def _inputs():
    gen = torch.Generator().manual_seed(0)
    batch, length, hidden_size, vocab = 4, 16, 8, 300
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 5:] = False
    return (
        torch.randn(batch, length, hidden_size, generator=gen, requires_grad=True),
        torch.randn(vocab, hidden_size, generator=gen, requires_grad=True),
        torch.randint(0, vocab, (batch, length), generator=gen),
        mask,
        torch.randn(batch, generator=gen),
    )


@pytest.mark.parametrize("sweep", ["one-pass", "two-pass"])
@pytest.mark.parametrize(
    "config",
    [
        APOConfig(beta=0.0),
        APOConfig(beta=0.0, importance_sampling_level="sequence"),
        APOConfig(beta=0.0, top_entropy_quantile=0.5),
    ],
    ids=["token", "sequence", "entropy"],
)
def test_apo_loss_path(sweep, config):
    if config.top_entropy_quantile < 1:
        sweep = "auto"
    stays = trace(apo_loss, *_inputs(), config=config, sweep=sweep)
    assert stays == ["loss.py", "inputs.py", "plan.py", "driver.py", "loss.py"]
    n_stays, returns = count(stays)
    assert n_stays <= 8 and returns <= 3


def test_fused_linear_logprobs_path():
    hidden, weight, targets, mask, _ = _inputs()
    stays = trace(fused_linear_logprobs, hidden, weight, targets, mask=mask, return_entropy=True)
    assert stays == ["logprobs.py", "inputs.py", "plan.py", "driver.py", "logprobs.py"]
    n_stays, returns = count(stays)
    assert n_stays <= 5 and returns <= 1


def test_the_trace_sees_a_bounce():
    """The tracer itself: a call that sends ``hidden`` back to a file it left counts as a return."""
    import apo_kernels.inputs as inputs

    def entry(hidden):
        inputs.float_tensor("hidden", hidden)
        return fused_linear_logprobs(hidden, torch.randn(5, 8), torch.zeros(3, dtype=torch.long))

    stays = trace(entry, torch.randn(3, 8))
    assert stays[:3] == ["inputs.py", "logprobs.py", "inputs.py"] and count(stays)[1] >= 1
