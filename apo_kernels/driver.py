"""The slab driver: log-probs and entropies of ``softmax(h W^T / tau + b)`` in tiles of the logits.

One driver serves every device and backend; only the *row pass* differs (``torch_backend.TorchRowPass``
on any device, ``kernels.TritonRowPass`` on CUDA or in the Triton interpreter). The big matmuls are plain
``torch.mm``/``addmm`` calls (cuBLAS on CUDA) with float32 output; the row pass does the per-logit work,
which is memory-bound.

Forward, for each tile of ``rows`` tokens x ``cols`` vocabulary columns (a vocabulary *slab*)::

    Z = X_c W_s^T                          (matmul, float32 output: logits never rounded to 16 bits)
    fold(Z)                                (row pass: z = Z / tau + b into the running max, sum-exp,
                                            sum p z and the target logit of each token; O(N) state)

Backward, per vocabulary slab, per token chunk (the logits are recomputed, never stored)::

    Z = X_c W_s^T;  dz = logit_grad(Z)     (row pass, from the saved statistics; dz in the operand dtype)
    dX_c += dz W_s / tau                   (float32 accumulator of N x D)
    dW_s += dz^T X_c / tau                 (float32 slab accumulator, written once per slab: no atomics)
    db_s += sum_n dz

8 N D V FLOPs in all. ``dX = dz W`` cancels over the vocabulary (``sum_v dz_v = 0``): with 16-bit ``dz``
the rounding of ``dz`` times a common component of the weight rows would dominate. Since the rows of
``dz`` sum to 0, ``dz W = dz (W - 1 c^T)`` for any row ``c``; the driver uses the mean weight row ``c``:
it sums the rounded ``dz`` of each token (``r``, in the row pass) and ends with ``dX -= r c^T / tau``, so
the rounding error is multiplied by ``W - c`` only. One rank-1 update, no second matmul.

With a vocabulary-parallel head (``shard``, see ``apo_kernels.vocab_parallel``) the loops sweep this rank's
block of the vocabulary; the fold states are merged over the ranks after the forward sweep, and the
partial ``d_hidden`` (and the weight's row sum for the centering) are summed over the ranks in backward.

One pass (:class:`OnePassLinearLogprobs`, for a loss whose per-token ``dL/dlogp`` and ``dL/dH`` follow from
that token's log-prob and entropy alone, as APO's do): per token chunk, the logits of the whole vocabulary
are kept, so the gradients come out of the forward sweep::

    Z = X_c W^T                            (matmul: one chunk of rows x V float32 logits)
    fold(Z[:, slab]) for each slab         (row pass, slab by slab for the cache; logits left as they are)
    g_logp, g_H = token_grads(logp_c, H_c) (the loss's derivatives of these tokens)
    dz = logit_grad(Z[:, slab]) ...        (row pass, into Z or a 16-bit dz chunk)
    dX_c = dz W / tau;  dW += dz^T X_c / tau   (matmuls; dW a float32 accumulator of V x D)

6 N D V FLOPs, and backward only scales the saved gradients by the incoming one (again under
``retain_graph``). The price: the float32 ``dW`` accumulator (the gradient itself for a float32 head), a
float32 ``dX`` (likewise for float32 ``hidden``) and the chunk's logits, and ``dW``'s read-modify-write per
chunk, which is why a chunk must be large (``ONE_PASS_MIN_ROWS``). :func:`plan_sweep` picks one or two
passes from the budget.

Workspace (the ``workspace_bytes`` knob): the tile of float32 logits (plus the 16-bit ``dz`` tile, plus
the torch row pass's temporaries) must fit in it, see :func:`plan_tile`; in one pass, the chunk and the
accumulators beyond the gradients, see :func:`plan_sweep`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

from .vocab_parallel import VocabShard

SLAB_COLUMNS = 4096  # widest slab: wide enough for cuBLAS to run near peak at D = 2048, no wider (memory)
MIN_TILE = (16, 128)  # smallest tile (tokens, columns) the workspace must hold
CPU_WORKSPACE_BYTES = 128 * 2**20
CUDA_WORKSPACE_BYTES = (64 * 2**20, 8 * 2**30)  # floor and cap of 1/16 of the device memory
# Smallest one-pass chunk (tokens) when the tokens take more than one: each chunk reads and writes the
# V x D float32 dW accumulator, 8 V D bytes against the 2 rows V D FLOPs the one pass saves, so it pays off
# above rows ~ 4 x FLOP/s / (bytes/s): ~1200 on an H100 (989 TFLOP/s, 3.35 TB/s), ~30 on 2 CPU cores.
ONE_PASS_MIN_ROWS = {"cuda": 1024, "cpu": 32}


class RowPass(Protocol):
    """The per-logit work of one tile; ``logits`` is the raw ``X_c W_s^T`` tile (compute dtype, unit column
    stride, rows possibly strided), which ``logit_grad`` may overwrite. ``inv_temp`` is a one-element
    compute-dtype tensor (1 / tau)."""

    def temp_bytes(self, acc: torch.dtype) -> int:
        """Workspace bytes per logit of a tile for the row pass's own temporaries."""

    def fold(self, logits, state, targets, v0: int, inv_temp, bias) -> None:
        """Fold the tile into ``state`` = ``(4, rows)``: running max, sum exp(z - max),
        sum exp(z - max) (z - max), target logit (for targets in ``[v0, v0 + cols)``). ``logits`` is read
        only (the one-pass sweep hands the same tile to ``logit_grad`` next)."""

    def logit_grad(self, logits, out, rowsum, stats, targets, grad_logp, grad_entropy, v0: int, inv_temp, bias,
                   dz_scale=None) -> None:
        """Write ``dz = g_logp (onehot - p) - g_H p (z - E[z])`` (not divided by tau), times the one-element
        ``dz_scale`` when given, into ``out`` (operand dtype; None: over ``logits``) from ``stats`` =
        ``(3, rows)``: max, log sum exp(z - max), E[z] - max. When ``rowsum`` is given, add each row's sum of
        the *rounded* ``dz`` to it."""


# The CPU dry run of the CUDA path (benchmarks/dry_run.py) runs it on meta tensors, which then take every CUDA
# branch (cuBLAS out_dtype matmuls, the Triton backend, CUDA's workspace and chunk rules) as on a GPU with this
# much memory; None: meta tensors are CPU-like.
_META_AS_CUDA_MEMORY: Optional[int] = None


@contextlib.contextmanager
def meta_as_cuda(total_memory: int):
    """Within this block, ``meta`` tensors stand for CUDA tensors on a GPU of ``total_memory`` bytes."""
    global _META_AS_CUDA_MEMORY
    saved, _META_AS_CUDA_MEMORY = _META_AS_CUDA_MEMORY, total_memory
    try:
        yield
    finally:
        _META_AS_CUDA_MEMORY = saved


def is_cuda(device: torch.device) -> bool:
    """Whether tensors on ``device`` take the CUDA path (a CUDA device, or ``meta`` under :func:`meta_as_cuda`)."""
    return device.type == "cuda" or (device.type == "meta" and _META_AS_CUDA_MEMORY is not None)


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32: the accumulation dtype of every backend."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def operand_dtype(hidden: torch.Tensor, weight: torch.Tensor, acc: torch.dtype) -> torch.dtype:
    """The dtype of the matmul operands (and of ``dz``): the shared 16-bit dtype of ``hidden`` and
    ``weight`` (tensor cores, float32 accumulation), else the compute dtype (mixed inputs are upcast)."""
    if hidden.dtype == weight.dtype and hidden.dtype in (torch.float16, torch.bfloat16):
        return hidden.dtype
    return acc


def default_workspace_bytes(device: torch.device) -> int:
    """128 MiB on CPU; on CUDA 1/16 of the device's memory, at least 64 MiB and at most 8 GiB (5 GiB on an
    80 GB GPU: room for the one-pass sweep of the Qwen2.5-VL head, see :func:`plan_sweep`). The total,
    not the free memory: a constant, so forward and backward (and eager and compiled runs) tile alike."""
    if not is_cuda(device):
        return CPU_WORKSPACE_BYTES
    floor, cap = CUDA_WORKSPACE_BYTES
    total = _META_AS_CUDA_MEMORY if device.type == "meta" else torch.cuda.get_device_properties(device).total_memory
    return max(floor, min(cap, total // 16))


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


SWEEPS = ("auto", "one-pass", "two-pass")


@dataclass(frozen=True)
class SweepPlan:
    one_pass: bool
    tile: Tile  # two passes: the tile; one pass: rows is the token chunk, cols the row pass's slab
    extra_bytes: int = 0  # the most memory the sweep takes beyond the inputs and their gradients


def fixed_extra_bytes(
    one_pass: bool, n_tokens: int, hidden_size: int, vocab: int, slab_cols: int, dtypes: tuple, needs_grad: tuple,
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
    sweep: str, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], row_pass: RowPass,
    workspace_bytes: int, *, needs_grad: tuple[bool, bool], min_chunk_rows: int = 1, shard: Optional[VocabShard] = None,
) -> SweepPlan:
    """One pass or two, and the tile, for ``(N, D)`` ``hidden`` and this rank's ``(V, D)`` ``weight``, such that
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
    if sweep not in SWEEPS:
        raise ValueError(f"sweep must be one of {SWEEPS}, got {sweep!r}")
    acc = compute_dtype(hidden, weight, bias)
    operand = operand_dtype(hidden, weight, acc)
    (n_tokens, hidden_size), vocab = hidden.shape, weight.shape[0]
    n_tokens = max(n_tokens, 1)
    logit_bytes = tile_logit_bytes(row_pass, operand, acc)
    need_h, need_w = needs_grad = (needs_grad[0], needs_grad[1])
    cols = min(vocab, SLAB_COLUMNS)
    fixed = lambda one_pass: fixed_extra_bytes(  # noqa: E731
        one_pass, n_tokens, hidden_size, vocab, cols, (hidden.dtype, weight.dtype, acc, operand), needs_grad)

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


ADDMM_OUT_DTYPE_TRACES = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 13)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, alpha: float = 1.0, beta: float = 1.0) -> None:
    """``out = beta * out + alpha * a @ b`` in ``out``'s (compute) dtype; 16-bit operands accumulate in float32
    (cuBLAS ``out_dtype`` on CUDA; upcast elsewhere, exact since products of 16-bit floats fit in float32).
    ``out=`` and in-place matmuls are untouched by ``torch.autocast``: the input dtypes set the precision."""
    if a.dtype == out.dtype:
        out.addmm_(a, b, beta=beta, alpha=alpha)
    elif is_cuda(a.device) and torch.compiler.is_compiling() and not ADDMM_OUT_DTYPE_TRACES:
        # Before torch 2.13 addmm with out_dtype does not trace (its decomposition takes out_dtype for beta); mm's
        # does. Its cost: the graph may merge a two-pass backward's recomputed logits with the forward's and keep
        # them (20.9 GiB at N = 32768 on the Qwen head under aot_eager, benchmarks/dry_run.py). beta is 0 or 1.
        if beta:
            out.add_(torch.mm(a, b, out_dtype=out.dtype), alpha=alpha)
        else:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
            if alpha != 1:
                out.mul_(alpha)
    elif is_cuda(a.device):
        torch.addmm(out, a, b, beta=beta, alpha=alpha, out_dtype=out.dtype, out=out)
    else:
        out.addmm_(a.to(out.dtype), b.to(out.dtype), beta=beta, alpha=alpha)


# float16 dz is scaled by a power of two that brings its largest possible entry near this: fp16 reaches 65504
# and is normal down to 6.1e-5, while unscaled dz of a token-mean over N tokens is ~A / N and its entries down
# to ~p A / N (p ~ 1e-5 for an untrained 150k vocabulary) would round to 0.
FP16_DZ_BOUND = 2.0**12


def dz_scale(operand: torch.dtype, grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
             vocab: int) -> Optional[torch.Tensor]:
    """None unless ``dz`` is float16; then the power of two (a one-element tensor, no host sync) it is scaled by so
    that its largest possible entry is near ``FP16_DZ_BOUND``: ``|dz_v| <= |g| + |g_H| p_v |log p_v + H| <=
    |g| + |g_H| (1 + log V)``. The matmuls' results are scaled back, exactly (a power of two)."""
    if operand != torch.float16:
        return None
    bound = sum(g.abs().amax().float() * factor for g, factor in ((grad_logp, 1.0), (grad_entropy, 1.0 + math.log(vocab)))
                if g is not None and g.numel())
    exponent = torch.floor(torch.log2(FP16_DZ_BOUND / torch.as_tensor(bound, dtype=torch.float32))).clamp(-64, 64)
    return torch.exp2(exponent).reshape(1)


def _spans(total: int, step: int):
    return ((start, min(start + step, total)) for start in range(0, total, step))


def _chunk_spans(total: int, step: int, ends: Optional[list[int]]):
    """Spans of at most ``step`` tokens; with ``ends`` (increasing, the last ``total``, no two more than
    ``step`` apart) each span ends at one of them: chunks of whole sequences, as many as fit."""
    if ends is None:
        yield from _spans(total, step)
        return
    start = previous = 0
    for end in ends:
        if end - start > step:
            yield start, previous
            start = previous
        previous = end
    if previous > start:
        yield start, previous


def _fresh_fold_state(n_tokens: int, acc: torch.dtype, device) -> torch.Tensor:
    state = torch.zeros((4, n_tokens), dtype=acc, device=device)
    state[0] = float("-inf")
    return state


def _finish_fold(state: torch.Tensor, shard: Optional[VocabShard]):
    """``(stats, logps, entropy)`` from a fold state of the whole vocabulary (merged over the ranks first)."""
    if shard is not None:
        shard.merge_fold_state(state)
    row_max, sum_exp, sum_ez, target_logit = state
    # m and log sum exp(z - m) stay apart (not one lse): with logits near +-100 a float32 lse loses ~1e-5
    log_sum = torch.log(sum_exp)
    mean_shifted = sum_ez / sum_exp  # E[z] - m
    stats = torch.stack([row_max, log_sum, mean_shifted])
    return stats, (target_logit - row_max) - log_sum, log_sum - mean_shifted  # H = log sum exp(z) - E[z]


class SlabLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, row_pass, tile, shard):
        acc = compute_dtype(hidden, weight, bias)
        operand = operand_dtype(hidden, weight, acc)
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        inv_temp = torch.full((1,), 1.0 / temperature, dtype=acc, device=hidden.device)
        h_op = hidden.to(operand)
        state = _fresh_fold_state(n_tokens, acc, hidden.device)
        workspace = torch.empty(tile.rows * tile.cols, dtype=acc, device=hidden.device)
        offset = 0 if shard is None else shard.offset  # global vocabulary id of the local row 0
        for v0, v1 in _spans(vocab, tile.cols):
            w_slab = weight[v0:v1].to(operand)
            b_slab = None if bias is None else bias[v0:v1]
            for n0, n1 in _spans(n_tokens, tile.rows):
                logits = workspace[: (n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0)
                _mm_into(logits, h_op[n0:n1], w_slab.T, beta=0.0)
                row_pass.fold(logits, state[:, n0:n1], targets[n0:n1], offset + v0, inv_temp, b_slab)
        del workspace
        stats, logps, entropy = _finish_fold(state, shard)
        ctx.save_for_backward(hidden, weight, bias, targets, stats, inv_temp)
        ctx.row_pass, ctx.tile, ctx.inv_temp, ctx.shard = row_pass, tile, 1.0 / temperature, shard
        ctx.set_materialize_grads(False)
        # No output is saved, so callers may edit them in place.
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, stats, inv_temp = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        nones = (None,) * 5
        if grad_logp is None and grad_entropy is None:
            return (None, None, None) + nones
        row_pass, tile, shard = ctx.row_pass, ctx.tile, ctx.shard
        offset = 0 if shard is None else shard.offset
        acc, device = stats.dtype, hidden.device
        operand = operand_dtype(hidden, weight, acc)
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        alpha = ctx.inv_temp
        h_op = hidden.to(operand)
        d_hidden = torch.zeros(hidden.shape, dtype=acc, device=device) if need_h else None
        d_weight = torch.empty_like(weight) if need_w else None
        d_weight_slab = torch.empty((tile.cols, weight.shape[1]), dtype=acc, device=device) if need_w else None
        d_bias = torch.zeros(vocab, dtype=acc, device=device) if need_b else None
        # Centering of dX (module docstring): only rounded dz needs it.
        centered = need_h and operand != acc
        rowsum = torch.zeros(n_tokens, dtype=acc, device=device) if centered else None
        weight_sum = torch.zeros(weight.shape[1], dtype=acc, device=device) if centered else None
        logits_buf = torch.empty(tile.rows * tile.cols, dtype=acc, device=device)
        in_place = operand == acc  # dz over the logits, in their dtype
        dz_buf = None if in_place else torch.empty(tile.rows * tile.cols, dtype=operand, device=device)
        total_vocab = vocab if shard is None else shard.vocab
        # every token's gradient is known here: one scale for the whole sweep, undone once at the end
        scale = dz_scale(operand, grad_logp, grad_entropy, total_vocab)
        for v0, v1 in _spans(vocab, tile.cols):
            w_slab = weight[v0:v1].to(operand)
            b_slab = None if bias is None else bias[v0:v1]
            if need_w:
                d_w = d_weight_slab[: v1 - v0].zero_()
            for n0, n1 in _spans(n_tokens, tile.rows):
                size = (n1 - n0) * (v1 - v0)
                logits = logits_buf[:size].view(n1 - n0, v1 - v0)
                dz = logits if in_place else dz_buf[:size].view(n1 - n0, v1 - v0)
                _mm_into(logits, h_op[n0:n1], w_slab.T, beta=0.0)
                row_pass.logit_grad(
                    logits, None if in_place else dz, None if rowsum is None else rowsum[n0:n1], stats[:, n0:n1], targets[n0:n1],
                    None if grad_logp is None else grad_logp[n0:n1],
                    None if grad_entropy is None else grad_entropy[n0:n1], offset + v0, inv_temp, b_slab, scale,
                )
                if need_b:
                    d_bias[v0:v1] += dz.sum(0, dtype=acc)  # the bias is added after the division by tau
                if need_h:
                    _mm_into(d_hidden[n0:n1], dz, w_slab, alpha=alpha)
                if need_w:
                    _mm_into(d_w, dz.T, h_op[n0:n1], alpha=alpha)
            if need_w:
                d_weight[v0:v1].copy_(d_w if scale is None else d_w.div_(scale))
            if centered:
                weight_sum += w_slab.sum(0, dtype=acc)
        if centered:
            # the mean row of the whole head; the sum over ranks of the local rowsum times it is r c^T
            weight_sum = weight_sum if shard is None else shard.all_reduce_sum(weight_sum)
            d_hidden.addr_(rowsum, weight_sum, alpha=-alpha / total_vocab)
        if scale is not None:
            for unscaled in (d_hidden, d_bias):
                if unscaled is not None:
                    unscaled.div_(scale)
        if need_h and shard is not None:
            shard.all_reduce_sum(d_hidden)
        return (
            d_hidden.to(hidden.dtype) if need_h else None,
            d_weight,
            d_bias.to(bias.dtype) if need_b else None,
        ) + nones


TokenGrads = Callable[[int, int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, Optional[torch.Tensor]]]
"""``token_grads(n0, n1, logps, entropy)``: the loss's ``(dL/dlogp, dL/dH or None)`` of tokens ``[n0, n1)``
from their log-probs and entropies (all ``(n1 - n0,)``). With ``chunk_ends``, ``[n0, n1)`` holds whole
sequences, so the gradient may depend on its sequences' other tokens (sequence-level ratios)."""


class OnePassLinearLogprobs(torch.autograd.Function):
    """Log-probs, entropies and a zero ``anchor`` whose gradient is that of the loss ``token_grads`` stands
    for: the loss is ``value + anchor``, with ``value`` computed from the (non-differentiable) log-probs
    and entropies, and backward scales the gradients the forward sweep accumulated (module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, row_pass, tile, shard, token_grads, chunk_ends=None):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc, device = compute_dtype(hidden, weight, bias), hidden.device
        operand = operand_dtype(hidden, weight, acc)
        (n_tokens, hidden_size), vocab = hidden.shape, weight.shape[0]
        alpha = 1.0 / temperature
        inv_temp = torch.full((1,), alpha, dtype=acc, device=device)
        offset = 0 if shard is None else shard.offset
        h_op, w_op = hidden.to(operand), weight.to(operand)
        logps = torch.empty(n_tokens, dtype=acc, device=device)
        entropy = torch.empty_like(logps)
        d_hidden = torch.empty((n_tokens, hidden_size), dtype=acc, device=device) if need_h else None
        d_weight = torch.zeros((vocab, hidden_size), dtype=acc, device=device) if need_w else None
        d_bias = torch.zeros(vocab, dtype=acc, device=device) if need_b else None
        centered = need_h and operand != acc  # centering of dX, as in SlabLinearLogprobs.backward
        if centered:
            weight_sum = w_op.sum(0, dtype=acc)
            weight_sum = weight_sum if shard is None else shard.all_reduce_sum(weight_sum)
            rowsum_buf = torch.empty(tile.rows, dtype=acc, device=device)
        chunk_buf = torch.empty(tile.rows * vocab, dtype=acc, device=device)
        in_place = operand == acc
        dz_buf = None if in_place else torch.empty(tile.rows * vocab, dtype=operand, device=device)
        slabs = list(_spans(vocab, tile.cols))
        total_vocab = vocab if shard is None else shard.vocab
        weight_scale = None  # float16 dz: the scale d_weight is accumulated in, that of the last chunk
        for n0, n1 in _chunk_spans(n_tokens, tile.rows, chunk_ends):
            rows, chunk_targets = n1 - n0, targets[n0:n1]
            logits = chunk_buf[: rows * vocab].view(rows, vocab)
            _mm_into(logits, h_op[n0:n1], w_op.T, beta=0.0)
            state = _fresh_fold_state(rows, acc, device)
            for v0, v1 in slabs:
                row_pass.fold(logits[:, v0:v1], state, chunk_targets, offset + v0, inv_temp,
                              None if bias is None else bias[v0:v1])
            stats, logps[n0:n1], entropy[n0:n1] = _finish_fold(state, shard)
            grad_logp, grad_entropy = token_grads(n0, n1, logps[n0:n1], entropy[n0:n1])
            dz = logits if in_place else dz_buf[: rows * vocab].view(rows, vocab)
            rowsum = rowsum_buf[:rows].zero_() if centered else None
            scale = dz_scale(operand, grad_logp, grad_entropy, total_vocab)
            for v0, v1 in slabs:
                row_pass.logit_grad(
                    logits[:, v0:v1], None if in_place else dz[:, v0:v1], rowsum, stats, chunk_targets, grad_logp,
                    grad_entropy, offset + v0, inv_temp, None if bias is None else bias[v0:v1], scale,
                )
            if need_b:
                d_bias += dz.sum(0, dtype=acc) if scale is None else dz.sum(0, dtype=acc).div_(scale)
            if need_h:
                _mm_into(d_hidden[n0:n1], dz, w_op, alpha=alpha, beta=0.0)
                if centered:
                    d_hidden[n0:n1].addr_(rowsum, weight_sum, alpha=-alpha / total_vocab)
                if scale is not None:
                    d_hidden[n0:n1].div_(scale)
            if need_w:
                if scale is not None:  # float16: bring d_weight to this chunk's scale (one more V x D read and write)
                    if weight_scale is not None:
                        d_weight.mul_(scale / weight_scale)
                    weight_scale = scale
                _mm_into(d_weight, dz.T, h_op[n0:n1], alpha=alpha)
        if weight_scale is not None:
            d_weight.div_(weight_scale)
        if need_h and shard is not None:
            shard.all_reduce_sum(d_hidden)
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(logps, entropy)
        ctx.set_materialize_grads(False)
        return logps, entropy, torch.zeros((), dtype=acc, device=device)

    @staticmethod
    def backward(ctx, _grad_logps, _grad_entropy, grad_anchor):
        nones = (None,) * 7
        if grad_anchor is None:
            return (None, None, None) + nones
        # New tensors (the saved ones stay for a second backward under retain_graph), each rounded once into
        # its input's dtype.
        return tuple(
            None if g is None else torch.mul(g, grad_anchor, out=torch.empty(g.shape, dtype=dtype, device=g.device))
            for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)
        ) + nones


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor],
    temperature: float,
    *,
    row_pass: RowPass,
    workspace_bytes: Optional[int] = None,
    tile: Optional[Tile] = None,
    shard: Optional[VocabShard] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N,)`` log-probs and entropies of ``targets`` under ``softmax(hidden @ weight.T / temperature + bias)``.

    Inputs are assumed validated (see ``logprobs.fused_linear_logprobs``). Outputs are float32, or float64
    when an input is float64. ``tile`` overrides the plan (tests force small tiles with it). With ``shard``,
    ``weight`` and ``bias`` are this rank's block of a vocabulary-parallel head (``apo_kernels.vocab_parallel``).
    """
    if tile is None:
        budget = default_workspace_bytes(hidden.device) if workspace_bytes is None else workspace_bytes
        grad = torch.is_grad_enabled()
        needs_grad = (grad and hidden.requires_grad, grad and (weight.requires_grad or bias is not None and bias.requires_grad))
        tile = plan_sweep("two-pass", hidden, weight, bias, row_pass, budget, needs_grad=needs_grad).tile
    return SlabLinearLogprobs.apply(hidden, weight, bias, targets, temperature, row_pass, tile, shard)
