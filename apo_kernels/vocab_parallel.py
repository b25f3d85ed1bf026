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
from typing import Optional

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


def _local_bias(bias: Optional[torch.Tensor], weight) -> Optional[torch.Tensor]:
    """The local tensor of a DTensor ``bias`` laid out as the DTensor ``weight`` (same mesh, same placements)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(bias, DTensor):
        return bias
    if bias.device_mesh != weight.device_mesh or bias.placements != weight.placements:
        raise ValueError(f"bias is a DTensor with placements {bias.placements}; expected weight's mesh and "
                         f"placements {weight.placements}")
    return bias.to_local()


def unwrap_dtensors(hidden, weight, bias, group):
    """``(hidden, weight, bias, group)`` with DTensors replaced by their local tensors.

    A ``weight`` sharded ``Shard(0)`` on a 1-D mesh is a vocabulary-parallel head: its mesh's group becomes
    ``group``. A replicated ``weight`` is a whole head. Other layouts (e.g. FSDP2 on a 2-D mesh) must be
    gathered first (``full_tensor()``). ``hidden`` may be a replicated DTensor.
    """
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(hidden, DTensor):
        if not all(p.is_replicate() for p in hidden.placements):
            raise ValueError(f"hidden is a DTensor with placements {hidden.placements}; expected it replicated "
                             "(every rank holds all tokens)")
        hidden = hidden.to_local()
    if not isinstance(weight, DTensor):
        if isinstance(bias, DTensor):
            raise ValueError("bias is a DTensor but weight is not; pass both as DTensors or both as local tensors")
        return hidden, weight, bias, group
    mesh, placements = weight.device_mesh, weight.placements
    if group is not None:
        raise ValueError("vocab_parallel_group must be None when weight is a DTensor: its device mesh gives the group")
    if mesh.ndim == 1 and placements[0] == Shard(0):
        group = mesh.get_group()
    elif not all(p.is_replicate() for p in placements):
        raise ValueError(
            f"weight is a DTensor with placements {placements} on a {mesh.ndim}-D mesh; apo_kernels takes a "
            "vocabulary-parallel head (Shard(0) on a 1-D mesh) or a replicated one: gather it with full_tensor()"
        )
    return hidden, weight.to_local(), _local_bias(bias, weight), group


def shard_of(group, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             valid_rows: Optional[torch.Tensor]) -> Optional[VocabShard]:
    """This rank's :class:`VocabShard` of ``group`` (None without a group, or for a group of one rank).

    One all-gather of a few integers per call: it finds the offset and the global vocabulary, and raises
    ``ValueError`` on every rank alike when the ranks disagree on what must be shared (tokens, hidden size,
    masked rows, bias or not) instead of letting a later collective hang.
    """
    if group is None:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("vocab_parallel_group is set but torch.distributed is not initialized")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"vocab_parallel_group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
    world = dist.get_world_size(group)
    if world == 1:
        return None
    n_tokens = hidden.shape[:-1].numel() if hidden.dim() else 0
    # filled on the device (no host-to-device copy), the unmasked count summed there: one sync, the gather's
    mine = torch.empty(5, dtype=torch.int64, device=hidden.device)
    for column, value in enumerate((weight.shape[0] if weight.dim() else 0, n_tokens,
                                    hidden.shape[-1] if hidden.dim() else 0, n_tokens, bias is not None)):
        mine[column] = value
    if valid_rows is not None:
        mine[3] = valid_rows.sum()
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).tolist()
    for column, what in ((1, "tokens (hidden rows)"), (2, "hidden size"), (3, "unmasked tokens"), (4, "bias or not")):
        if len({row[column] for row in table}) > 1:
            raise ValueError(
                f"vocab_parallel_group: every rank must pass the same hidden states, targets and mask; the ranks "
                f"disagree on {what}: {[row[column] for row in table]}"
            )
    sizes = [row[0] for row in table]
    rank = dist.get_rank(group)
    return VocabShard(group=group, offset=sum(sizes[:rank]), vocab=sum(sizes))
