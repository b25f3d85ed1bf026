"""The row pass in plain PyTorch: any device, and the CPU path of ``apo_kernels.driver``.

Same contract as the Triton row pass (``apo_kernels.kernels.TritonRowPass``); the driver, the matmuls and
the saved statistics are shared, so the CPU suite runs the loops the GPU runs.
"""

from __future__ import annotations

from typing import Optional

import torch


def _scale(logits: torch.Tensor, inv_temp: torch.Tensor, bias: Optional[torch.Tensor], *, out=None) -> torch.Tensor:
    """``z = logits / tau + b`` (the bias after the temperature division), into ``out`` (None: a new tensor)."""
    z = torch.mul(logits, inv_temp, out=out) if out is not None else logits * inv_temp
    return z if bias is None else z.add_(bias.to(z.dtype))


def _target_columns(targets: torch.Tensor, v0: int, cols: int):
    """Which targets fall in the slab ``[v0, v0 + cols)``, and their (clamped) columns in it."""
    return (targets >= v0) & (targets < v0 + cols), (targets - v0).clamp(0, cols - 1)[:, None]


class TorchRowPass:
    name = "torch"

    def temp_bytes(self, acc: torch.dtype) -> int:
        # about three tile-sized temporaries of the elementwise ops
        return 3 * acc.itemsize

    def fold(self, logits, state, targets, v0, inv_temp, bias) -> None:
        z = _scale(logits, inv_temp, bias)  # a copy: the driver's one-pass sweep reads the logits again
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

    def logit_grad(
        self, logits, out, rowsum, stats, targets, grad_logp, grad_entropy, v0, inv_temp, bias, dz_scale=None
    ) -> None:
        row_max, log_sum, mean_shifted = stats
        # log p = (z - m) - log_sum, subtracted in two steps as torch.log_softmax does (m may be ~100)
        log_p = _scale(logits, inv_temp, bias, out=logits).sub_(row_max[:, None]).sub_(log_sum[:, None])
        p = torch.exp(log_p)
        # dz = g (onehot - p) - g_H p (log p + H), with H = log_sum - mean_shifted: p (a + c log p) + g onehot
        zero = torch.zeros_like(log_sum)
        g = zero if grad_logp is None else grad_logp.to(p.dtype)
        g_h = zero if grad_entropy is None else grad_entropy.to(p.dtype)
        a = -(g + g_h * (log_sum - mean_shifted))
        dz = log_p.mul_(-g_h[:, None]).add_(a[:, None]).mul_(p)
        if grad_logp is not None:
            here, cols = _target_columns(targets, v0, p.shape[1])
            dz.scatter_add_(1, cols, torch.where(here, g, zero)[:, None])
        if dz_scale is not None:
            dz.mul_(dz_scale)
        if out is not None:
            out.copy_(dz)
        if rowsum is not None:
            rowsum += (dz if out is None else out).sum(1, dtype=rowsum.dtype)


ROW_PASS = TorchRowPass()
