"""``linear_logprobs``: the autograd Function around the forward and the two backward kernels.

Saved for backward: the inputs and three ``(N,)`` statistics per token (row max, log-sum of the shifted
exponentials and the mean shifted logit; see ``logprobs_fwd``), never the outputs. Gradients are
accumulated in float32 (float64 for float64 inputs). When a gradient is stored in that dtype it is the
accumulator itself; otherwise the kernels fill a scratch buffer of at most ``TileConfig.scratch_bytes``
one slab of rows at a time, and each slab is cast into the gradient.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import torch_backend
from ..torch_backend import compute_dtype
from .logprobs_bwd_hidden import hidden_grad_rows
from .logprobs_bwd_weight import weight_grad_rows
from .logprobs_fwd import logprobs_forward
from .tuning import DEFAULT_TILES, TileConfig, dot_dtype, operand_dtype


def _accumulate_in_slabs(
    shape, dtype, acc, device, block: int, budget: int, launch: Callable[[torch.Tensor, int, int], None]
) -> torch.Tensor:
    """A ``shape`` gradient in ``dtype`` from ``launch(accumulator, start, end)`` over row ranges."""
    rows, width = shape
    if dtype == acc:
        out = torch.zeros(shape, dtype=acc, device=device)
        launch(out, 0, rows)
        return out
    out = torch.empty(shape, dtype=dtype, device=device)
    slab = max(block, budget // (width * acc.itemsize) // block * block)
    scratch = torch.empty((min(slab, rows), width), dtype=acc, device=device)
    for start in range(0, rows, slab):
        end = min(start + slab, rows)
        accumulator = scratch[: end - start].zero_()
        launch(accumulator, start, end)
        out[start:end].copy_(accumulator)
    return out


class TritonLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, tiles):
        acc = compute_dtype(hidden, weight, bias)
        operand = operand_dtype(hidden, weight, acc)
        inv_temp = torch.full((1,), 1.0 / temperature, dtype=acc, device=hidden.device)
        logp, entropy, stats = logprobs_forward(
            hidden, weight, targets, bias, inv_temp, acc=acc, dot=dot_dtype(operand, acc), tiles=tiles
        )
        ctx.save_for_backward(hidden, weight, bias, targets, stats, inv_temp)
        ctx.tiles = tiles
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, stats, inv_temp = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        tiles = ctx.tiles
        if grad_logp is None and grad_entropy is None or hidden.shape[0] == 0:
            zeros = lambda x, need: torch.zeros_like(x) if need else None  # noqa: E731
            return zeros(hidden, need_h), zeros(weight, need_w), zeros(bias, need_b), None, None, None
        acc = stats.dtype
        operand = operand_dtype(hidden, weight, acc)
        common = dict(operand=operand, dot=dot_dtype(operand, acc), tiles=tiles)
        args = (hidden, weight, targets, bias, stats, grad_logp, grad_entropy, inv_temp)
        d_hidden = d_weight = d_bias = None
        if need_h:
            d_hidden = _accumulate_in_slabs(
                hidden.shape, hidden.dtype, acc, hidden.device, tiles.block_n, tiles.scratch_bytes,
                lambda buf, start, end: hidden_grad_rows(buf, start, end, *args, **common),
            )
        if need_b:
            d_bias = torch.empty(weight.shape[0], dtype=acc, device=weight.device)
        if need_w:
            d_weight = _accumulate_in_slabs(
                weight.shape, weight.dtype, acc, weight.device, tiles.block_v, tiles.scratch_bytes,
                lambda buf, start, end: weight_grad_rows(buf, d_bias, start, end, *args, **common),
            )
        elif need_b:
            weight_grad_rows(None, d_bias, 0, weight.shape[0], *args, **common)
        return d_hidden, d_weight, None if d_bias is None else d_bias.to(bias.dtype), None, None, None


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    *,
    tiles: TileConfig = DEFAULT_TILES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N,)`` log-probs and entropies of ``targets`` under ``softmax(hidden @ weight.T / temperature + bias)``.

    Same contract as ``apo_kernels.torch_backend.linear_logprobs`` (validated inputs; float32 outputs, or
    float64 when an input is float64). Float64 runs in the kernels in the interpreter (the tests' oracle
    precision); on CUDA it is delegated to the torch backend, as float64 matmuls have no fast Triton path.
    """
    if hidden.is_cuda and compute_dtype(hidden, weight, bias) == torch.float64:
        return torch_backend.linear_logprobs(hidden, weight, targets, bias, temperature)
    return TritonLinearLogprobs.apply(hidden, weight, bias, targets, temperature, tiles)
