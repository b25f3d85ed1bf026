"""``TritonRowPass``: the driver's row pass as Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import torch

from .logit_grad import logit_grad
from .logprob_fold import logprob_fold
from .row_params import DEFAULT_ROW_PARAMS, RowKernelParams


class TritonRowPass:
    name = "triton"

    def __init__(self, params: RowKernelParams = DEFAULT_ROW_PARAMS):
        self.params = params

    def temp_bytes(self, acc: torch.dtype) -> int:
        return 0  # the kernels keep their temporaries in registers

    def fold(self, logits, state, targets, v0, inv_temp, bias) -> None:
        logprob_fold(logits, state, targets, v0, inv_temp, bias, self.params.block, self.params.num_warps)

    def logit_grad(
        self, logits, out, rowsum, stats, targets, grad_logp, grad_entropy, v0, inv_temp, bias, dz_scale=None
    ) -> None:
        logit_grad(
            logits,
            out,
            rowsum,
            stats,
            targets,
            grad_logp,
            grad_entropy,
            v0,
            inv_temp,
            bias,
            dz_scale,
            self.params.block,
            self.params.num_warps,
        )


ROW_PASS = TritonRowPass()
