"""``fused_linear_logprobs``: validated entry point and backend dispatch.

Backends (same contract: ``(hidden (N, D), weight (V, D), targets (N,), bias, temperature)`` in,
``(logps, entropy)`` of shape ``(N,)`` out, float32 or float64 when an input is float64):

Both backends run the same slab driver (``apo_kernels.driver``: cuBLAS/torch matmuls with float32 output)
and differ only in the row pass, the per-logit work:

- ``"triton"``: the Triton row kernels in ``apo_kernels.kernels``; needs CUDA tensors, or CPU tensors with
  ``TRITON_INTERPRET=1`` set before ``triton`` is first imported (how the test suite runs them);
- ``"torch"``: the row pass in plain PyTorch (``apo_kernels.torch_backend``), any device;
- ``"auto"``: Triton for CUDA tensors when Triton is installed, the torch backend otherwise.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional

import torch

from . import checks, driver, torch_backend, vocab_parallel

BACKENDS = ("auto", "torch", "triton")
# Looked up once here: inside the traced call, find_spec breaks torch.compile's graph (torch 2.11).
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend (``"torch"`` or ``"triton"``) that ``backend`` means for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if driver.is_cuda(device) and TRITON_INSTALLED else "torch"
    if backend == "triton":
        if not TRITON_INSTALLED:
            raise ValueError("backend='triton' needs the triton package (pip install triton); use backend='torch'")
        if not driver.is_cuda(device) and not triton_interpreted():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device.type}); on CPU set TRITON_INTERPRET=1 before "
                "importing triton to run the kernels in the interpreter, or use backend='torch'"
            )
    return backend


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
    return float(temperature)


def check_mask(mask, like: torch.Tensor, values: checks.ValueChecks) -> torch.Tensor:
    """A bool or 0/1 ``mask`` shaped like ``hidden.shape[:-1]`` (``like`` is ``hidden``), as a bool tensor; its
    0/1 check joins ``values``."""
    checks.tensor("mask", mask, dtypes=(torch.bool,) + checks.INT_DTYPES + checks.FLOAT_DTYPES, kind="a bool or 0/1")
    checks.shape("mask", mask, like.shape[:-1], "hidden.shape[:-1]")
    checks.same_device("mask", mask, like, "hidden")
    values.zero_or_one("mask", mask)
    return mask.bool()


def check_linear_inputs(hidden, weight, targets, bias, *, target_mask: Optional[torch.Tensor] = None,
                        vocab: Optional[int] = None, values: Optional[checks.ValueChecks] = None) -> None:
    """Types, shapes, devices and values of the LM-head inputs (``hidden`` is ``(..., D)``); ``vocab`` is the
    size of the whole vocabulary when ``weight`` is one rank's block of it. The value checks join ``values``
    (read by the caller), or are read here when it is None."""
    pending = checks.ValueChecks() if values is None else values
    checks.float_tensor("hidden", hidden)
    checks.float_tensor("weight", weight)
    checks.tensor("targets", targets, dtypes=checks.INT_DTYPES, kind="an integer")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., D), got a 0-dim tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"weight must have shape (V, D) = (V, {hidden.shape[-1]}) with V >= 1 to match hidden's last dim, "
            f"got {tuple(weight.shape)}"
        )
    checks.shape("targets", targets, hidden.shape[:-1], "hidden.shape[:-1]")
    checks.same_device("weight", weight, hidden, "hidden")
    checks.same_device("targets", targets, hidden, "hidden")
    if bias is not None:
        checks.float_tensor("bias", bias)
        checks.shape("bias", bias, (weight.shape[0],), "(V,)")
        checks.same_device("bias", bias, hidden, "hidden")
        pending.finite("bias", bias)
    pending.finite("hidden", hidden, None if target_mask is None else target_mask[..., None].expand(hidden.shape))
    pending.finite("weight", weight)
    vocab = weight.shape[0] if vocab is None else vocab
    pending.in_range("targets", targets, 0, vocab, target_mask, described=" (vocabulary ids of the LM head)")
    if values is None:
        pending.verify()


def check_head_inputs(hidden, weight, targets, bias, valid: Optional[torch.Tensor], vocab_parallel_group,
                      values: checks.ValueChecks):
    """:func:`check_linear_inputs` for a whole head, or for this rank's block of a vocabulary-parallel one
    (``weight``/``bias`` already local tensors), its value checks joining ``values``; returns the rank's
    :class:`~apo_kernels.vocab_parallel.VocabShard` (None for a whole head)."""
    checks.float_tensor("weight", weight)
    shard = vocab_parallel.shard_of(vocab_parallel_group, hidden, weight, bias, valid)
    check_linear_inputs(hidden, weight, targets, bias, target_mask=valid, vocab=None if shard is None else shard.vocab,
                        values=values)
    return shard


def check_workspace_bytes(workspace_bytes) -> Optional[int]:
    if workspace_bytes is None:
        return None
    if isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int):
        raise TypeError(f"workspace_bytes must be an int (bytes) or None, got {type(workspace_bytes).__name__}")
    if workspace_bytes <= 0:
        raise ValueError(f"workspace_bytes must be > 0, got {workspace_bytes}")
    return workspace_bytes


class RowSelection:
    """The rows of a flat ``(N,)`` bool ``mask`` that the vocabulary sweep visits.

    Rows where the mask is False are dropped before the sweep (they cost nothing) and come back as 0. Under
    ``torch.compile`` the number of valid rows cannot shape the graph, so every row is swept, masked ones
    as zeros (hidden states, target 0, per-token terms), and zeroed after: the same values and gradients,
    at full cost.
    """

    def __init__(self, mask: Optional[torch.Tensor]):
        self.mask = mask
        self.rows = None  # indices of the swept rows; None: all of them
        self.zero_masked = mask is not None and not checks.values_checked(mask)
        if mask is not None and not self.zero_masked:
            rows = mask.nonzero().squeeze(1)
            self.rows = rows if rows.numel() < mask.numel() else None

    def take(self, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The swept rows of ``x`` (``(N, ...)``)."""
        if x is None:
            return None
        if self.zero_masked:
            return torch.where(self.mask.view(-1, *(1,) * (x.dim() - 1)), x, torch.zeros_like(x))
        return x if self.rows is None else x.index_select(0, self.rows)

    def put(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` results from those of the swept rows, 0 at masked rows."""
        if self.zero_masked:
            return torch.where(self.mask, x, 0.0)
        return x if self.rows is None else x.new_zeros(self.mask.numel()).index_put((self.rows,), x)


def row_pass_of(backend: str) -> driver.RowPass:
    """The row pass of a resolved backend."""
    if backend == "triton":
        from .kernels import ROW_PASS

        return ROW_PASS
    return torch_backend.ROW_PASS


def linear_logprobs(
    hidden, weight, targets, bias, temperature, backend: str, mask: Optional[torch.Tensor] = None,
    workspace_bytes: Optional[int] = None, shard: Optional[vocab_parallel.VocabShard] = None,
):
    """Unvalidated dispatch on flat ``(N, D)`` / ``(N,)`` inputs; ``backend`` is already resolved, ``shard``
    is this rank's block of a vocabulary-parallel head (or None); rows where the flat bool ``mask`` is False
    are skipped and come back as 0 (:class:`RowSelection`)."""
    rows = RowSelection(mask)
    logps, entropy = driver.linear_logprobs(
        rows.take(hidden), weight, rows.take(targets), bias, temperature, row_pass=row_pass_of(backend),
        workspace_bytes=workspace_bytes, shard=shard,
    )
    return rows.put(logps), rows.put(entropy)


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
            the CUDA device memory within [64 MiB, 8 GiB], 128 MiB on CPU (see ``apo_kernels.driver``).
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
    temperature = check_temperature(temperature)
    workspace_bytes = check_workspace_bytes(workspace_bytes)
    hidden, weight, bias, group = vocab_parallel.unwrap_dtensors(hidden, weight, bias, vocab_parallel_group)
    checks.float_tensor("hidden", hidden)
    values = checks.ValueChecks()
    valid = None if mask is None else check_mask(mask, hidden, values)
    shard = check_head_inputs(hidden, weight, targets, bias, valid, group, values)
    values.verify()
    resolved = resolve_backend(backend, hidden.device)
    out_shape = targets.shape
    logps, entropy = linear_logprobs(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), bias, temperature, resolved,
        mask=None if valid is None else valid.reshape(-1), workspace_bytes=workspace_bytes, shard=shard,
    )
    return logps.view(out_shape), (entropy.view(out_shape) if return_entropy else None)
