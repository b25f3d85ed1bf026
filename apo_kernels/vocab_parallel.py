"""Vocabulary-parallel LM heads: each rank holds a contiguous block of the vocabulary rows.

This is Megatron's (and ``torch.distributed.tensor``'s ``Shard(0)``) tensor-parallel LM head. ``hidden``
and the global ``targets`` are the same on every rank; rank ``r`` holds rows ``[offset_r, offset_r + V_r)``
of ``weight`` (and ``bias``), blocks in rank order, sizes free. The slab driver sweeps the local block
only; it then needs (O(N) communication, never O(N V)):

- planning a one-pass sweep: one all-reduce (min) of the tokens per chunk, so every rank sweeps the same
  chunks and the per-chunk collectives below pair up whatever the block sizes;
- forward: one all-reduce of the max, one all-reduce (sum) of ``(sum exp(z - M), sum exp(z - M)(z - M),
  target logit)`` rescaled to the global max ``M`` (only the owner of a target contributes its logit), so
  every rank holds the statistics of the whole vocabulary and returns the same log-probs and entropies;
- backward: the local ``dz`` from those statistics, ``dW`` and ``db`` of the local block, and the full
  ``d_hidden`` on every rank (the sum of the local ``dz W`` over ranks, as Megatron's column-parallel input
  gradient), plus an all-reduce of the weight's row sum (``D`` numbers) for the centering of ``d_hidden``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class VocabShard:
    """This rank's block ``[offset, offset + local vocab)`` of a ``vocab``-row LM head split over ``group``."""

    group: "dist.ProcessGroup"
    offset: int
    vocab: int

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def min_over_ranks(self, value: int, device: torch.device) -> int:
        """The smallest of the ranks' ``value`` (one all-reduce of one number on ``device``, read on the host)."""
        x = torch.full((1,), value, dtype=torch.int64, device=device)
        dist.all_reduce(x, op=dist.ReduceOp.MIN, group=self.group)
        return int(x.item())

    def merge_fold_state(self, state: torch.Tensor) -> None:
        """Turn the ``(4, N)`` fold state of the local block (max, sum exp(z - max), sum exp(z - max)(z - max),
        target logit or 0) into the state of the whole vocabulary, in place."""
        local_max = state[0].clone()
        dist.all_reduce(state[0], op=dist.ReduceOp.MAX, group=self.group)
        shift = local_max - state[0]  # <= 0; finite: every block has at least one (finite) logit
        scale = torch.exp(shift)
        # sum exp(z - M)(z - M) = e^shift (sum exp(z - m)(z - m) + shift * sum exp(z - m))
        state[2] = scale * (state[2] + shift * state[1])
        state[1] *= scale
        self.all_reduce_sum(state[1:])
