"""``fused_linear_logprobs``: log-probs (and entropies) from hidden states and the LM head.

Backends (same contract: ``(hidden (N, D), weight (V, D), targets (N,), bias, temperature)`` in,
``(logps, entropy)`` of shape ``(N,)`` out, float32 or float64 when an input is float64):

Both backends run the same slab driver (``apo_kernels.driver``: cuBLAS/torch matmuls with float32 output)
and differ only in the row pass, the per-logit work:

- ``"triton"``: the Triton row kernels in ``apo_kernels.kernels``; needs CUDA tensors, or CPU tensors with
  ``TRITON_INTERPRET=1`` set before ``triton`` is first imported (how the test suite runs them);
- ``"torch"``: the row pass in plain PyTorch (``apo_kernels.torch_backend``), any device;
- ``"auto"``: Triton for CUDA tensors when Triton is installed, the torch backend otherwise.

The call runs the stages in order: inputs, plan (two passes: the loss is the caller's), the driver's sweep.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import driver
from .inputs import head_inputs
from .plan import plan_head


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
    workspace_bytes: Optional[int] = None,
    vocab_parallel_group=None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs (and entropies) of ``targets`` under ``softmax(hidden @ weight.T / temperature + bias)``.

    Never materializes the ``N x V`` logits. Differentiable with respect to ``hidden``, ``weight`` and
    ``bias`` (also when ``weight`` is tied to an embedding); the weight gradient is skipped when
    ``weight.requires_grad`` is False. Note that ``bias`` is added *after* the temperature division.

    Args:
        hidden: ``(..., D)`` hidden states (bf16, fp16, fp32 or fp64), e.g. ``(B, T, D)`` or ``(N, D)``.
        weight: ``(V, D)`` LM-head weight (any float dtype). When it differs from ``hidden``'s (e.g. a bf16
            backbone with a float32 head) both are promoted: the matmuls take float32 operands (float64 if
            either is float64), nothing is rounded down, and each gradient comes back in its input's dtype.
        targets: ``hidden.shape[:-1]`` integer token ids in ``[0, V)``.
        bias: optional ``(V,)`` LM-head bias.
        temperature: logits are divided by it (> 0).
        return_entropy: also return the entropy of each token's distribution.
        mask: optional ``targets``-shaped bool (or 0/1): positions where it is False are not computed
            (no vocabulary sweep), may hold any target id (e.g. -100) and come back as 0.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see the module docstring).
        workspace_bytes: the most memory one tile of logits (and its gradient) may take; default 1/16 of
            the CUDA device memory within [64 MiB, 8 GiB], 128 MiB on CPU (see ``apo_kernels.plan``).
        vocab_parallel_group: a tensor-parallel (vocabulary-sharded) LM head: ``weight`` (and ``bias``) are
            this rank's contiguous block of vocabulary rows, blocks in rank order of this process group (sizes
            may differ), while ``hidden``, ``targets`` and ``mask`` are the same on every rank. The results are
            the same on every rank; ``hidden``'s gradient is the full one on every rank (as Megatron's
            column-parallel input gradient), ``weight``'s that of the local block. A ``weight`` that is a
            ``DTensor`` sharded ``Shard(0)`` on a 1-D mesh selects this mode by itself (see
            ``apo_kernels.vocab_parallel``). FSDP2's sharded parameters look the same but hold data-parallel
            shards: gather them first (``apo_kernels.integrations.lm_head.lm_head_for_loss`` does).

    Returns:
        ``(logps, entropy)``: ``targets``-shaped float32 tensors (float64 for float64 inputs); ``entropy``
        is None unless ``return_entropy``.
    """
    head = head_inputs(
        hidden,
        weight,
        targets,
        mask=mask,
        bias=bias,
        temperature=temperature,
        backend=backend,
        workspace_bytes=workspace_bytes,
        vocab_parallel_group=vocab_parallel_group,
    )
    logps, entropy, _ = driver.sweep(head, plan_head(head))
    return logps.view(head.out_shape), (entropy.view(head.out_shape) if return_entropy else None)
