"""The row pass in plain PyTorch: any device, and the CPU path of ``apo_kernels.driver``.

Same contract as the Triton row pass (``apo_kernels.kernels.TritonRowPass``); the driver, the matmuls and
the saved statistics are shared, so the CPU suite runs the loops the GPU runs.
"""

from __future__ import annotations

from typing import Optional

import torch


def _scaled(logits: torch.Tensor, inv_temp: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``z = logits / tau + b`` in place (the bias after the temperature division)."""
    logits.mul_(inv_temp)
    return logits if bias is None else logits.add_(bias.to(logits.dtype))


def _target_columns(targets: torch.Tensor, v0: int, cols: int):
    """Which targets fall in the slab ``[v0, v0 + cols)``, and their (clamped) columns in it."""
    return (targets >= v0) & (targets < v0 + cols), (targets - v0).clamp(0, cols - 1)[:, None]


class TorchRowPass:
    name = "torch"

    def logit_bytes(self, operand: torch.dtype, acc: torch.dtype) -> int:
        # the logits tile, about three tile-sized temporaries of the elementwise ops, and a 16-bit dz tile
        return 4 * acc.itemsize + (operand.itemsize if operand != acc else 0)

    def fold(self, logits, state, targets, v0, inv_temp, bias) -> None:
        z = _scaled(logits, inv_temp, bias)
        run_max, sum_exp, sum_ez, target_logit = state
        here, cols = _target_columns(targets, v0, z.shape[1])
        target_logit.copy_(torch.where(here, z.gather(1, cols).squeeze(1), target_logit))
        new_max = torch.maximum(run_max, z.amax(1))
        rescale = torch.exp(run_max - new_max)
        # (run_max - new_max) * sum_exp is -inf * 0 before the first slab
        shift_term = torch.where(sum_exp > 0, (run_max - new_max) * sum_exp, torch.zeros_like(sum_exp))
        shifted = z.sub_(new_max[:, None])
        e = torch.exp(shifted)
        # sum_j e_j (z_j - max) is kept relative to the running max, so an entropy near 0 does not cancel
        sum_ez.copy_(rescale * (sum_ez + shift_term) + (e * shifted).sum(1))
        sum_exp.copy_(rescale * sum_exp + e.sum(1))
        run_max.copy_(new_max)

    def logit_grad(self, logits, out, rowsum, stats, targets, grad_logp, grad_entropy, v0, inv_temp, bias) -> None:
        row_max, log_sum, mean_shifted = stats
        shifted = _scaled(logits, inv_temp, bias).sub_(row_max[:, None])
        # (z - m) - log_sum subtracts numbers of similar size, as torch.log_softmax does
        p = torch.exp(shifted - log_sum[:, None])
        dz = torch.zeros_like(p)
        if grad_logp is not None:
            g = grad_logp.to(p.dtype)
            dz -= g[:, None] * p
            here, cols = _target_columns(targets, v0, p.shape[1])
            dz.scatter_add_(1, cols, torch.where(here, g, torch.zeros_like(g))[:, None])
        if grad_entropy is not None:
            dz -= grad_entropy.to(p.dtype)[:, None] * p * (shifted - mean_shifted[:, None])
        out = logits if out is None else out
        out.copy_(dz)
        if rowsum is not None:
            rowsum += out.sum(1, dtype=rowsum.dtype)


ROW_PASS = TorchRowPass()
