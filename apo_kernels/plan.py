"""The plan stage: the backend, the rows the sweep visits, one pass or two, and the tile, decided once per call.

Everything here reads shapes, dtypes and the workspace budget, never values (except the row selection's one
``nonzero``, outside ``torch.compile``), so forward and backward, and eager and compiled runs, tile alike.

Workspace (the ``workspace_bytes`` knob): the tile of float32 logits (plus the 16-bit ``dz`` tile, plus the
torch row pass's temporaries) must fit in it, see :func:`plan_tile`; in one pass, the chunk and the
accumulators beyond the gradients, see :func:`plan_sweep`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .devices import is_cuda, total_memory
from .driver import RowPass, RowSelection
from .inputs import SWEEPS, HeadInputs, LossInputs, compute_dtype, dtype_of, operand_dtype
from .objective import Epilogue, EpilogueGrads, torch_epilogue, torch_epilogue_grads
from .vocab_parallel import VocabShard

SLAB_COLUMNS = 4096  # widest slab: wide enough for cuBLAS to run near peak at D = 2048, no wider (memory)
MIN_TILE = (16, 128)  # smallest tile (tokens, columns) the workspace must hold
CPU_WORKSPACE_BYTES = 128 * 2**20
CUDA_WORKSPACE_BYTES = (64 * 2**20, 8 * 2**30)  # floor and cap of 1/16 of the device memory
# Smallest one-pass chunk (tokens) when the tokens take more than one: each chunk reads and writes the
# V x D float32 dW accumulator, 8 V D bytes against the 2 rows V D FLOPs the one pass saves, so it pays off
# above rows ~ 4 x FLOP/s / (bytes/s): ~1200 on an H100 (989 TFLOP/s, 3.35 TB/s), ~30 on 2 CPU cores.
ONE_PASS_MIN_ROWS = {"cuda": 1024, "cpu": 32}


def default_workspace_bytes(device: torch.device) -> int:
    """128 MiB on CPU; on CUDA 1/16 of the device's memory, at least 64 MiB and at most 8 GiB (5 GiB on an
    80 GB GPU: room for the one-pass sweep of the Qwen2.5-VL head, see :func:`plan_sweep`). The total,
    not the free memory: a constant, so forward and backward (and eager and compiled runs) tile alike."""
    if not is_cuda(device):
        return CPU_WORKSPACE_BYTES
    floor, cap = CUDA_WORKSPACE_BYTES
    return max(floor, min(cap, total_memory(device) // 16))


@dataclass(frozen=True)
class Tile:
    rows: int  # tokens per chunk
    cols: int  # vocabulary columns per slab


def plan_tile(n_tokens: int, vocab: int, logit_bytes: int, workspace_bytes: int, reserved: int = 0) -> Tile:
    """The largest tile within the budget less ``reserved`` bytes: slabs of ``SLAB_COLUMNS`` (or the whole
    vocabulary) over as many tokens as fit, all of them if possible; narrower slabs only once a chunk would
    drop below ``MIN_TILE`` tokens. Raises ``ValueError`` when not even ``MIN_TILE`` fits."""
    min_rows, min_cols = min(n_tokens, MIN_TILE[0]), min(vocab, MIN_TILE[1])
    room = workspace_bytes - reserved
    if room < min_rows * min_cols * logit_bytes:
        beside = f" beside {reserved} bytes of accumulators and statistics" if reserved else ""
        raise ValueError(
            f"workspace_bytes={workspace_bytes} cannot hold the smallest tile ({min_rows} tokens x {min_cols} "
            f"vocabulary columns x {logit_bytes} bytes = {min_rows * min_cols * logit_bytes} bytes){beside}; raise it"
        )
    cols = min(vocab, SLAB_COLUMNS)
    rows = min(n_tokens, room // (cols * logit_bytes))
    if rows < min_rows:
        rows = min_rows
        cols = min(cols, room // (rows * logit_bytes))
    return Tile(rows=max(rows, 1), cols=cols)


def tile_logit_bytes(row_pass: RowPass, operand: torch.dtype, acc: torch.dtype) -> int:
    """Workspace bytes per logit of a tile: the logit, a separate ``dz`` unless ``dz`` is written over the
    logits in their dtype, and the row pass's temporaries."""
    return acc.itemsize + (operand.itemsize if operand != acc else 0) + row_pass.temp_bytes(acc)


@dataclass(frozen=True)
class SweepPlan:
    one_pass: bool
    tile: Tile  # two passes: the tile; one pass: rows is the token chunk, cols the row pass's slab
    extra_bytes: int = 0  # the most memory the sweep takes beyond the inputs and their gradients


def fixed_extra_bytes(
    one_pass: bool,
    n_tokens: int,
    hidden_size: int,
    vocab: int,
    slab_cols: int,
    dtypes: tuple,
    needs_grad: tuple,
) -> int:
    """Memory beyond the inputs and their gradients that does not grow with the tile, for ``dtypes`` =
    ``(hidden, weight, compute, operand)`` and ``needs_grad`` = ``(hidden, weight)``:

    - gradient accumulators in the compute dtype: one pass keeps ``dW`` (and ``dX``) saved for backward, which
      then writes the gradients into new tensors, so they count even for float32 inputs; two passes accumulate
      ``dX`` in place (extra only when ``hidden`` is not in the compute dtype) and ``dW`` one slab at a time;
    - operand copies of mixed inputs: ``hidden`` whole, the head whole in one pass and a slab at a time in two;
    - per-token statistics, the bias gradient and ``O(D)`` vectors (an upper bound: 8 numbers per token,
      2 per vocabulary row and per hidden unit).
    """
    hidden_dtype, weight_dtype, acc, operand = dtypes
    need_h, need_w = needs_grad
    if one_pass:
        accumulators = (vocab if need_w else 0) + (n_tokens if need_h else 0)
    else:
        accumulators = (slab_cols if need_w else 0) + (n_tokens if need_h and hidden_dtype != acc else 0)
    copies = (n_tokens if hidden_dtype != operand else 0) + (
        (vocab if one_pass else slab_cols) if weight_dtype != operand else 0
    )
    small = 8 * n_tokens + 2 * vocab + 2 * hidden_size
    return acc.itemsize * (accumulators * hidden_size + small) + operand.itemsize * copies * hidden_size


def plan_sweep(
    sweep: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    row_pass: RowPass,
    workspace_bytes: int,
    *,
    needs_grad: tuple[bool, bool],
    min_chunk_rows: int = 1,
    shard: Optional[VocabShard] = None,
    n_tokens: Optional[int] = None,
) -> SweepPlan:
    """One pass or two, and the tile, for ``n_tokens`` swept rows (default ``N``) of ``(N, D)`` ``hidden`` and this
    rank's ``(V, D)`` ``weight``, such that
    everything the sweep takes beyond the inputs and their gradients (:func:`fixed_extra_bytes` and the tile
    or chunk) fits in ``workspace_bytes``; ``SweepPlan.extra_bytes`` is that total.

    ``needs_grad`` says whether ``hidden`` and ``weight`` (or its bias) get gradients; with neither, only the
    forward sweep runs (the two-pass plan), whatever ``sweep`` asks for. One pass needs the float32 gradient
    accumulators and a chunk of ``rows x V`` logits (plus ``dz`` and the row pass's slab temporaries);
    ``"auto"`` takes it when the workspace holds a chunk of all the tokens or of at least ``ONE_PASS_MIN_ROWS``
    of them, ``"one-pass"`` whenever one token fits (else a ``ValueError``). ``min_chunk_rows`` is the fewest
    tokens a one-pass chunk may hold (the longest sequence, for sequence-level ratios): below it ``"auto"``
    takes two passes and ``"one-pass"`` raises. A row pass without temporaries (the Triton kernels) folds a
    one-pass chunk's whole vocabulary in one launch; the torch row pass works slab by slab. With ``shard`` (a
    vocabulary-parallel head) the one-pass chunk is the smallest any rank's block allows (one all-reduce), so
    every rank runs the same chunks and their per-chunk collectives pair up.
    """
    assert sweep in SWEEPS, sweep
    acc = compute_dtype(hidden.dtype, weight.dtype, dtype_of(bias))
    operand = operand_dtype(hidden.dtype, weight.dtype, acc)
    hidden_size, vocab = hidden.shape[1], weight.shape[0]
    n_tokens = max(hidden.shape[0] if n_tokens is None else n_tokens, 1)
    logit_bytes = tile_logit_bytes(row_pass, operand, acc)
    need_h, need_w = needs_grad = (needs_grad[0], needs_grad[1])
    cols = min(vocab, SLAB_COLUMNS)
    fixed = lambda one_pass: fixed_extra_bytes(
        one_pass, n_tokens, hidden_size, vocab, cols, (hidden.dtype, weight.dtype, acc, operand), needs_grad
    )

    def two_pass() -> SweepPlan:
        tile = plan_tile(n_tokens, vocab, logit_bytes, workspace_bytes, fixed(False))
        return SweepPlan(False, tile, fixed(False) + tile.rows * tile.cols * logit_bytes)

    if sweep == "two-pass" or not (need_h or need_w):
        return two_pass()
    temp_bytes = row_pass.temp_bytes(acc)
    slab = vocab if temp_bytes == 0 else cols
    row_bytes = vocab * (logit_bytes - temp_bytes) + slab * temp_bytes
    rows = min(n_tokens, max(workspace_bytes - fixed(True), 0) // row_bytes)
    if shard is not None:  # each chunk's fold statistics are all-reduced: the ranks' chunks must match
        rows = shard.min_over_ranks(rows, hidden.device)
    min_chunk_rows = min(max(min_chunk_rows, 1), n_tokens)
    if sweep == "one-pass" and rows < min_chunk_rows:
        what = "one token's" if min_chunk_rows == 1 else f"the longest sequence's {min_chunk_rows} tokens' "
        raise ValueError(
            f"sweep='one-pass' needs workspace_bytes >= {fixed(True) + min_chunk_rows * row_bytes} (gradient "
            f"accumulators and copies of {fixed(True)} bytes and {what}{vocab} logits), got {workspace_bytes}; raise "
            "it or use sweep='two-pass'"
        )
    if rows < min_chunk_rows:
        return two_pass()
    if sweep == "auto" and rows < min(n_tokens, ONE_PASS_MIN_ROWS["cuda" if is_cuda(hidden.device) else "cpu"]):
        return two_pass()
    return SweepPlan(True, Tile(rows=rows, cols=slab), fixed(True) + rows * row_bytes)


@dataclass(frozen=True)
class Backend:
    """What a resolved backend name stands for: the row pass of the sweep and the APO epilogue."""

    name: str
    row_pass: RowPass
    epilogue: Epilogue
    epilogue_grads: EpilogueGrads


def backend_of(name: str) -> Backend:
    """The :class:`Backend` of a resolved name (``inputs.check_backend``); Triton is imported only when used."""
    if name == "triton":
        from .kernels import ROW_PASS, apo_epilogue, apo_epilogue_grads

        return Backend(name, ROW_PASS, apo_epilogue, apo_epilogue_grads)
    from .torch_backend import ROW_PASS

    return Backend(name, ROW_PASS, torch_epilogue, torch_epilogue_grads)


@dataclass(frozen=True)
class Plan:
    """Everything the sweep needs besides the inputs, decided once."""

    backend: Backend
    rows: RowSelection
    sweep: SweepPlan
    chunk_ends: Optional[list[int]]  # where one-pass chunks may end (sequence-level ratios); None: anywhere
    dtype: torch.dtype  # the compute dtype: of the log-probs, entropies and accumulators

    @property
    def one_pass(self) -> bool:
        return self.sweep.one_pass

    @property
    def tile(self) -> Tile:
        return self.sweep.tile


def plan_head(head: HeadInputs, sweep: str = "two-pass", *, sequences: Optional[torch.Tensor] = None) -> Plan:
    """The :class:`Plan` of a call on ``head``: on the rows actually swept, within ``head.workspace_bytes`` (or
    the device's default), agreed across vocabulary-parallel ranks. ``sequences``: the ``(B, T)`` mask whose
    rows one-pass chunks must keep whole (sequence-level ratios)."""
    backend = backend_of(head.backend)
    rows = RowSelection(head.valid)
    chunk_ends, longest = (None, 1) if sequences is None else rows.sequence_ends(sequences)
    budget = default_workspace_bytes(head.hidden.device) if head.workspace_bytes is None else head.workspace_bytes
    grad = torch.is_grad_enabled()
    bias = head.bias
    needs_grad = (
        grad and head.hidden.requires_grad,
        grad and (head.weight.requires_grad or (bias is not None and bias.requires_grad)),
    )
    planned = plan_sweep(
        sweep,
        head.hidden,
        head.weight,
        bias,
        backend.row_pass,
        budget,
        needs_grad=needs_grad,
        min_chunk_rows=longest,
        shard=head.shard,
        n_tokens=rows.count,
    )
    return Plan(backend, rows, planned, chunk_ends, compute_dtype(head.hidden.dtype, head.weight.dtype, dtype_of(bias)))


def plan_loss(inputs: LossInputs) -> Plan:
    """:func:`plan_head` for :func:`apo_kernels.apo_loss`: two passes when ``config.top_entropy_quantile < 1``
    (the threshold needs every token's entropy before any gradient); whole sequences per one-pass chunk when the
    terms read whole sequences (sequence-level ratios, the off-policy mask)."""
    config = inputs.objective.config
    sweep = "two-pass" if config.top_entropy_quantile < 1 else inputs.sweep
    return plan_head(inputs.head, sweep, sequences=inputs.objective.mask if config.whole_sequences else None)
