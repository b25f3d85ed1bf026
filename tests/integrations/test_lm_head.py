"""``lm_head_for_loss``, shared by the TRL and verl adapters, hands the bias over in apo_kernels' convention.

Both frameworks compute ``(h W^T + b) / tau``; apo_kernels computes ``h W^T / tau + bias``. The adapters'
own tests check the same through their forwards (``tests/integrations/trl/test_apo_trainer.py``,
``tests/integrations/verl/test_fused_forward.py``); this one checks the function they both call.
"""

import pytest
import torch

from apo_kernels import fused_linear_logprobs
from apo_kernels.integrations.lm_head import lm_head_for_loss

VOCAB, HIDDEN = 37, 8


def head_model(bias: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=bias).double()
    if bias:
        with torch.no_grad():
            model.lm_head.bias.mul_(20.0)  # a bias that matters
    return model


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.6])
def test_biased_head_gives_the_frameworks_logits_over_temperature(temperature):
    """Log-probs, entropy and the bias gradient equal those of log_softmax((h W^T + b) / tau)."""
    model = head_model(bias=True)
    hidden = torch.randn(6, HIDDEN, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (6,))

    with lm_head_for_loss(model, model.lm_head, temperature=temperature) as (weight, bias, vocab_parallel_group):
        assert vocab_parallel_group is None
        logps, entropy = fused_linear_logprobs(
            hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=True
        )
    (grad,) = torch.autograd.grad(logps.sum(), model.lm_head.bias)

    log_probs = torch.log_softmax(model.lm_head(hidden) / temperature, -1)
    want_logps = log_probs.gather(-1, labels[:, None]).squeeze(-1)
    (want_grad,) = torch.autograd.grad(want_logps.sum(), model.lm_head.bias)
    torch.testing.assert_close(logps, want_logps)
    torch.testing.assert_close(entropy, -(log_probs.exp() * log_probs).sum(-1).detach())
    torch.testing.assert_close(grad, want_grad)


def test_unbiased_head_has_no_bias():
    model = head_model(bias=False)
    with lm_head_for_loss(model, model.lm_head, temperature=0.7) as (weight, bias, _):
        assert weight is model.lm_head.weight
        assert bias is None
