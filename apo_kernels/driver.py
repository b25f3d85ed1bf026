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
    g_logp, g_H = chunk_grads(logp_c, H_c) (the loss's derivatives of these tokens)
    dz = logit_grad(Z[:, slab]) ...        (row pass, into Z or a 16-bit dz chunk)
    dX_c = dz W / tau;  dW += dz^T X_c / tau   (matmuls; dW a float32 accumulator of V x D)

6 N D V FLOPs, and backward only scales the saved gradients by the incoming one (again under
``retain_graph``). The price: the float32 ``dW`` accumulator (the gradient itself for a float32 head), a
float32 ``dX`` (likewise for float32 ``hidden``) and the chunk's logits, and ``dW``'s read-modify-write per
chunk, which is why a chunk must be large (``plan.ONE_PASS_MIN_ROWS``). ``plan.plan_sweep`` picks one or two
passes from the budget; the driver only runs the loops of the plan it is given (:func:`sweep`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Protocol

import torch
from torch.autograd.function import once_differentiable

from .devices import is_cuda
from . import inputs  # inputs.values_checked read at call time: the dry run replaces it
from .inputs import HeadInputs, compute_dtype, dtype_of, operand_dtype
from .vocab_parallel import VocabShard

if TYPE_CHECKING:
    from .plan import Plan


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

    def logit_grad(
        self, logits, out, rowsum, stats, targets, grad_logp, grad_entropy, v0: int, inv_temp, bias, dz_scale=None
    ) -> None:
        """Write ``dz = g_logp (onehot - p) - g_H p (z - E[z])`` (not divided by tau), times the one-element
        ``dz_scale`` when given, into ``out`` (operand dtype; None: over ``logits``) from ``stats`` =
        ``(3, rows)``: max, log sum exp(z - max), E[z] - max. When ``rowsum`` is given, add each row's sum of
        the *rounded* ``dz`` to it."""


class RowSelection:
    """The rows of a flat ``(N,)`` bool ``mask`` that the vocabulary sweep visits, and the one rule that decides it
    (the plan builds it; :func:`sweep` takes and puts rows with it, the one-pass loss hook takes its terms).

    Rows where the mask is False are dropped before the sweep (they cost nothing) and come back as 0. Under
    ``torch.compile`` (and for meta tensors) the number of valid rows cannot shape the graph, so every row is
    swept, masked ones as zeros (hidden states, target 0, per-token terms), and zeroed after: the same values
    and gradients, at full cost.
    """

    def __init__(self, mask: Optional[torch.Tensor]):
        self.mask = mask
        self.rows = None  # indices of the swept rows; None: all of them
        self.zero_masked = mask is not None and not inputs.values_checked(mask)
        if mask is not None and not self.zero_masked:
            rows = mask.nonzero().squeeze(1)
            self.rows = rows if rows.numel() < mask.numel() else None
        # how many rows are swept; None: all of them, the mask's absence says nothing of their number
        self.count = None if mask is None else mask.numel() if self.rows is None else self.rows.numel()

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

    def sequence_ends(self, mask: torch.Tensor) -> tuple[list[int], int]:
        """Where each sequence (row of the ``(B, T)`` ``mask`` this selection flattens) ends among the swept
        rows, the only places a one-pass chunk may end with sequence-level ratios, and the most rows a sequence
        has there (at least 1). When every row is swept, the ends are static."""
        batch, length = mask.shape
        counts = [length] * batch if self.zero_masked else mask.sum(-1).tolist()
        ends, total, longest = [], 0, 1
        for count in counts:
            total, longest = total + count, max(longest, count)
            if count:
                ends.append(total)
        return ends, longest


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


def dz_scale(
    operand: torch.dtype, grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor], vocab: int
) -> Optional[torch.Tensor]:
    """None unless ``dz`` is float16; then the power of two (a one-element tensor, no host sync) it is scaled by so
    that its largest possible entry is near ``FP16_DZ_BOUND``: ``|dz_v| <= |g| + |g_H| p_v |log p_v + H| <=
    |g| + |g_H| (1 + log V)``. The matmuls' results are scaled back, exactly (a power of two)."""
    if operand != torch.float16:
        return None
    bound = sum(
        g.abs().amax().float() * factor
        for g, factor in ((grad_logp, 1.0), (grad_entropy, 1.0 + math.log(vocab)))
        if g is not None and g.numel()
    )
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
        acc = compute_dtype(hidden.dtype, weight.dtype, dtype_of(bias))
        operand = operand_dtype(hidden.dtype, weight.dtype, acc)
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
    @once_differentiable  # the recomputed logits are not differentiated again: a second order raises
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, stats, inv_temp = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        nones = (None,) * 5
        if grad_logp is None and grad_entropy is None:
            return (None, None, None) + nones
        row_pass, tile, shard = ctx.row_pass, ctx.tile, ctx.shard
        offset = 0 if shard is None else shard.offset
        acc, device = stats.dtype, hidden.device
        operand = operand_dtype(hidden.dtype, weight.dtype, acc)
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
                    logits,
                    None if in_place else dz,
                    None if rowsum is None else rowsum[n0:n1],
                    stats[:, n0:n1],
                    targets[n0:n1],
                    None if grad_logp is None else grad_logp[n0:n1],
                    None if grad_entropy is None else grad_entropy[n0:n1],
                    offset + v0,
                    inv_temp,
                    b_slab,
                    scale,
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


class ChunkGrads(Protocol):
    """The loss's hook into the one-pass sweep (``objective.OnePassGrads``): the ``(dL/dlogp, dL/dH or None)``
    of tokens ``[n0, n1)`` from their log-probs and entropies (all ``(n1 - n0,)``). With ``chunk_ends``,
    ``[n0, n1)`` holds whole sequences, so the gradient may depend on its sequences' other tokens."""

    def __call__(
        self, n0: int, n1: int, logps: torch.Tensor, entropy: torch.Tensor
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]: ...


class OnePassLinearLogprobs(torch.autograd.Function):
    """Log-probs, entropies and a zero ``anchor`` whose gradient is that of the loss ``chunk_grads`` stands
    for: the loss is ``value + anchor``, with ``value`` computed from the (non-differentiable) log-probs
    and entropies, and backward scales the gradients the forward sweep accumulated (module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, row_pass, tile, shard, chunk_grads, chunk_ends=None):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc, device = compute_dtype(hidden.dtype, weight.dtype, dtype_of(bias)), hidden.device
        operand = operand_dtype(hidden.dtype, weight.dtype, acc)
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
                row_pass.fold(
                    logits[:, v0:v1], state, chunk_targets, offset + v0, inv_temp, None if bias is None else bias[v0:v1]
                )
            stats, logps[n0:n1], entropy[n0:n1] = _finish_fold(state, shard)
            grad_logp, grad_entropy = chunk_grads(n0, n1, logps[n0:n1], entropy[n0:n1])
            dz = logits if in_place else dz_buf[: rows * vocab].view(rows, vocab)
            rowsum = rowsum_buf[:rows].zero_() if centered else None
            scale = dz_scale(operand, grad_logp, grad_entropy, total_vocab)
            for v0, v1 in slabs:
                row_pass.logit_grad(
                    logits[:, v0:v1],
                    None if in_place else dz[:, v0:v1],
                    rowsum,
                    stats,
                    chunk_targets,
                    grad_logp,
                    grad_entropy,
                    offset + v0,
                    inv_temp,
                    None if bias is None else bias[v0:v1],
                    scale,
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
        if torch.is_grad_enabled():  # create_graph=True: the saved gradients are constants, a second order would be 0
            raise RuntimeError(
                "the one-pass sweep cannot differentiate twice (create_graph=True): its gradients were "
                "computed in the forward; for a gradient penalty use apo_kernels.reference.apo_loss"
            )
        nones = (None,) * 7
        if grad_anchor is None:
            return (None, None, None) + nones
        # New tensors (the saved ones stay for a second backward under retain_graph), each rounded once into
        # its input's dtype.
        return (
            tuple(
                None if g is None else torch.mul(g, grad_anchor, out=torch.empty(g.shape, dtype=dtype, device=g.device))
                for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)
            )
            + nones
        )


def sweep(head: HeadInputs, plan: "Plan", chunk_grads: Optional[ChunkGrads] = None):
    """``(N,)`` log-probs and entropies of ``head``'s targets (0 at masked rows), float32 (float64 for float64
    inputs), and the anchor of the loss's gradients (None after a two-pass sweep, whose gradients flow through
    the log-probs): the plan's rows, backend and tile; ``chunk_grads`` when the plan is one pass."""
    rows = plan.rows
    args = (
        rows.take(head.hidden),
        head.weight,
        head.bias,
        rows.take(head.targets),
        head.temperature,
        plan.backend.row_pass,
        plan.tile,
        head.shard,
    )
    if plan.one_pass:
        logps, entropy, anchor = OnePassLinearLogprobs.apply(*args, chunk_grads, plan.chunk_ends)
    else:
        (logps, entropy), anchor = SlabLinearLogprobs.apply(*args), None
    return rows.put(logps), rows.put(entropy), anchor
