"""Vocabulary-parallel LM head (``vocab_parallel_group=``, or a ``Shard(0)`` DTensor weight): 2 and 3 gloo
ranks, each holding a contiguous block of vocabulary rows (uneven sizes), against one process computing
the whole head with materialized logits in float64."""

import dataclasses
import itertools

import pytest
import torch
import torch.distributed as dist

from apo_kernels import APOConfig, apo_loss, fused_linear_logprobs, inputs, plan, reference
from apo_kernels.torch_backend import ROW_PASS as TORCH_ROW_PASS
from tests.distributed import run_ranks
from tests.strategies import TOLERANCE, assert_close, make_linear_problem, oracle_linear, run_linear

# (name, world size, vocabulary block sizes, extra arguments of the case)
LINEAR_CASES = [
    dict(seed=0, tokens=23, hidden=9, profile="normal", bias=True, temperature=0.7, masked=True),
    dict(seed=1, tokens=17, hidden=6, profile="all_negative", bias=False, temperature=1.0, masked=False),
    dict(seed=2, tokens=19, hidden=7, profile="block_offsets", bias=True, temperature=1.3, masked=True),
]
BACKENDS = ("torch", "triton")


def small_workspace(hidden, weight, bias) -> int:
    """Room for tiles of 16 tokens x 128 columns (40 bytes a logit covers every dtype and row pass) beside what
    the two-pass sweep reserves: slabs of 128 columns, so a rank's block spans several slabs."""
    acc = inputs.compute_dtype(hidden.dtype, weight.dtype, inputs.dtype_of(bias))
    dtypes = (hidden.dtype, weight.dtype, acc, inputs.operand_dtype(hidden.dtype, weight.dtype, acc))
    reserved = plan.fixed_extra_bytes(
        False,
        hidden.shape[:-1].numel(),
        hidden.shape[-1],
        weight.shape[0],
        min(weight.shape[0], plan.SLAB_COLUMNS),
        dtypes,
        (True, True),
    )
    return reserved + 16 * 128 * 40


def _problem(case, sizes, dtype=torch.float64):
    p = make_linear_problem(
        case["tokens"],
        case["hidden"],
        sum(sizes),
        seed=case["seed"],
        profile=case["profile"],
        with_bias=case["bias"],
        temperature=case["temperature"],
        block=7,
        dtype=dtype,
    )
    gen = torch.Generator().manual_seed(100 + case["seed"])
    mask = (
        torch.rand(case["tokens"], generator=gen) > 0.3
        if case["masked"]
        else torch.ones(case["tokens"], dtype=torch.bool)
    )
    mask[0] = True
    g_logp, g_ent = torch.randn(2, case["tokens"], generator=gen, dtype=torch.float64)
    return p, mask, g_logp, g_ent


def _grads(outputs, g_logp, g_ent, leaves):
    logps, entropy = outputs
    objective = (logps.double() * g_logp).sum() + (entropy.double() * g_ent).sum()
    return list(torch.autograd.grad(objective, [x for x in leaves if x is not None]))


def _linear_on_rank(rank, world_size, sizes, cases, backends):
    """Every (case, backend) on this rank's block: log-probs, entropies and gradients."""
    offset = sum(sizes[:rank])
    block = slice(offset, offset + sizes[rank])
    results = []
    for case in cases:
        p, mask, g_logp, g_ent = _problem(case, sizes)
        targets = torch.where(mask, p.targets, -100)  # masked ids are anything
        for backend in backends:
            hidden = p.hidden.clone().requires_grad_()
            weight = p.weight[block].clone().requires_grad_()
            bias = None if p.bias is None else p.bias[block].clone().requires_grad_()
            out = fused_linear_logprobs(
                hidden,
                weight,
                targets,
                bias=bias,
                temperature=p.temperature,
                return_entropy=True,
                mask=mask,
                backend=backend,
                workspace_bytes=small_workspace(hidden, weight, bias),
                vocab_parallel_group=dist.group.WORLD,
            )
            results.append([t.detach() for t in out] + _grads(out, g_logp, g_ent, [hidden, weight, bias]))
    return results


def _linear_oracle(case, sizes):
    p, mask, g_logp, g_ent = _problem(case, sizes)
    leaves = [
        p.hidden.clone().requires_grad_(),
        p.weight.clone().requires_grad_(),
        None if p.bias is None else p.bias.clone().requires_grad_(),
    ]
    logps, entropy = reference.linear_logprobs(
        leaves[0], leaves[1], p.targets, bias=leaves[2], temperature=p.temperature, return_entropy=True
    )
    out = (logps * mask, entropy * mask)
    return [t.detach() for t in out] + _grads(out, g_logp, g_ent, leaves)


@pytest.mark.interpreter  # the ranks run both row passes
@pytest.mark.parametrize("sizes", [[20, 17], [13, 5, 19]], ids=["2-ranks", "3-ranks-uneven"])
def test_vocab_parallel_logprobs_match_one_process(sizes):
    """Log-probs, entropies, ``d_hidden`` (full, on every rank), and each rank's block of ``d_weight`` and
    ``d_bias`` equal the single-process float64 oracle to 1e-12, for both row passes; every rank returns
    the same log-probs, entropies and ``d_hidden``, bit for bit."""
    per_rank = run_ranks(_linear_on_rank, len(sizes), sizes, LINEAR_CASES, BACKENDS)
    for case_index, case in enumerate(LINEAR_CASES):
        exact = _linear_oracle(case, sizes)
        for backend_index, backend in enumerate(BACKENDS):
            got = [results[case_index * len(BACKENDS) + backend_index] for results in per_rank]
            for rank, values in enumerate(got):
                offset = sum(sizes[:rank])
                block = slice(offset, offset + sizes[rank])
                what = f"case {case_index}, {backend}, rank {rank}"
                assert_close(values[0], exact[0], 1e-12, f"{what}: logps")
                assert_close(values[1], exact[1], 1e-12, f"{what}: entropy")
                assert_close(values[2], exact[2], 1e-12, f"{what}: d_hidden")
                assert_close(values[3], exact[3][block], 1e-12, f"{what}: d_weight block")
                if case["bias"]:
                    assert_close(values[4], exact[4][block], 1e-12, f"{what}: d_bias block")
                for shared in range(3):
                    assert torch.equal(values[shared], got[0][shared]), f"{what}: output {shared} differs from rank 0"


def _bf16_problem():
    return make_linear_problem(
        33, 40, 1031, seed=1, profile="all_negative", with_bias=True, temperature=0.7, block=128, dtype=torch.bfloat16
    )


def _bf16_on_rank(rank, world_size, sizes):
    p = _bf16_problem()
    offset = sum(sizes[:rank])
    local = p.__class__(
        p.hidden,
        p.weight[offset : offset + sizes[rank]],
        p.targets,
        p.bias[offset : offset + sizes[rank]],
        p.temperature,
        p.profile,
    )
    return [
        run_linear(
            local,
            lambda q: fused_linear_logprobs(
                q.hidden,
                q.weight,
                q.targets,
                bias=q.bias,
                temperature=q.temperature,
                return_entropy=True,
                backend=backend,
                workspace_bytes=small_workspace(q.hidden, q.weight, q.bias),
                vocab_parallel_group=dist.group.WORLD,
            ),
        )
        for backend in BACKENDS
    ]


@pytest.mark.interpreter  # the ranks run both row passes
def test_vocab_parallel_16_bit_hidden_gradient_is_centered_on_the_whole_head():
    """bf16 with a -200 weight column common to all rows: ``d_hidden`` stays within the plain bf16 bound
    only if the centering uses the mean row of the whole head (all ranks), not of the local block."""
    sizes = [515, 516]
    exact = run_linear(_bf16_problem().upcast(), oracle_linear)
    for rank, per_backend in enumerate(run_ranks(_bf16_on_rank, 2, sizes)):
        for backend, got in zip(BACKENDS, per_backend):
            assert_close(got[2], exact[2], TOLERANCE[torch.bfloat16], f"{backend}, rank {rank}: d_hidden")


APO_CONFIG = APOConfig(beta=0.05, temperature=0.8, eps_low=0.2, eps_high=0.28, entropy_coef=0.01)


def _apo_problem(sizes):
    gen = torch.Generator().manual_seed(7)
    batch, length, hidden_size, vocab = 3, 8, 10, sum(sizes)
    hidden = torch.randn(batch, length, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) / hidden_size**0.5
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.rand(batch, length, generator=gen) > 0.25
    advantages = torch.randn(batch, generator=gen, dtype=torch.float64)
    old_logps = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 4
    ref_logps = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 4
    kl_weights = torch.rand(batch, generator=gen, dtype=torch.float64) * 2
    return (
        hidden,
        weight,
        bias,
        targets,
        mask,
        dict(advantages=advantages, old_logps=old_logps, ref_logps=ref_logps, kl_weights=kl_weights),
    )


def _apo_loss_grads(loss_fn, hidden, weight, bias, targets, mask, extra):
    leaves = [hidden.clone().requires_grad_(), weight, bias]
    out = loss_fn(leaves[0], leaves[1], targets, mask, bias=leaves[2], **extra)
    grads = torch.autograd.grad(out.loss, leaves)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    return [out.loss.detach(), out.logps, out.entropy] + [local(g) for g in grads]


def _apo_on_rank(rank, world_size, sizes, config):
    """apo_loss with an explicit group on this rank's block, and with a Shard(0) DTensor head (torch's own
    even split), both with the Triton row pass in the interpreter."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    hidden, weight, bias, targets, mask, extra = _apo_problem(sizes)
    offset = sum(sizes[:rank])
    block = slice(offset, offset + sizes[rank])
    run = lambda *a, **k: apo_loss(*a, config=config, backend="triton", **k)
    explicit = [
        _apo_loss_grads(
            lambda *a, **k: run(*a, vocab_parallel_group=dist.group.WORLD, sweep=sweep, **k),
            hidden,
            weight[block].clone().requires_grad_(),
            bias[block].clone().requires_grad_(),
            targets,
            mask,
            extra,
        )
        for sweep in ("one-pass", "two-pass")
    ]
    mesh = init_device_mesh("cpu", (world_size,))
    as_dtensor = lambda t: distribute_tensor(t.clone(), mesh, [Shard(0)]).requires_grad_()
    dtensor = _apo_loss_grads(run, hidden, as_dtensor(weight), as_dtensor(bias), targets, mask, extra)
    return *explicit, dtensor


@pytest.mark.interpreter  # the ranks run the Triton row pass
@pytest.mark.parametrize(
    "sizes, level",
    [([20, 17], "token"), ([13, 5, 19], "token"), ([20, 17], "sequence")],
    ids=["2-ranks", "3-ranks-uneven", "2-ranks-sequence-ratio"],
)
def test_vocab_parallel_apo_loss_matches_one_process(sizes, level):
    """The APO loss (DADS weights, clipping, KL, entropy bonus, temperature, bias, masked tokens; token or
    sequence ratios) is the same on every rank and equals one process's, and so do the gradients, in one
    pass and in two; the DTensor head too."""
    config = dataclasses.replace(APO_CONFIG, importance_sampling_level=level)
    hidden, weight, bias, targets, mask, extra = _apo_problem(sizes)
    exact = _apo_loss_grads(
        lambda *a, **k: reference.apo_loss(*a, config=config, **k),
        hidden,
        weight.requires_grad_(),
        bias.requires_grad_(),
        targets,
        mask,
        extra,
    )
    dtensor_sizes = [len(c) for c in torch.arange(sum(sizes)).chunk(len(sizes))]
    names = ("loss", "logps", "entropy", "d_hidden", "d_weight", "d_bias")
    for rank, (one_pass, two_pass, dtensor) in enumerate(run_ranks(_apo_on_rank, len(sizes), sizes, config)):
        for how, got, block_sizes in (
            ("group, one pass", one_pass, sizes),
            ("group, two passes", two_pass, sizes),
            ("DTensor", dtensor, dtensor_sizes),
        ):
            offset = sum(block_sizes[:rank])
            block = slice(offset, offset + block_sizes[rank])
            for name, g, e in zip(names, got, exact):
                assert_close(g, e[block] if name in ("d_weight", "d_bias") else e, 1e-12, f"{how}, rank {rank}: {name}")


def _one_pass_on_rank(rank, world_size, sizes, config, workspace_bytes):
    """apo_loss in one pass on this rank's block, within ``workspace_bytes``."""
    hidden, weight, bias, targets, mask, extra = _apo_problem(sizes)
    offset = sum(sizes[:rank])
    block = slice(offset, offset + sizes[rank])
    return _apo_loss_grads(
        lambda *a, **k: apo_loss(
            *a,
            config=config,
            backend="torch",
            sweep="one-pass",
            workspace_bytes=workspace_bytes,
            vocab_parallel_group=dist.group.WORLD,
            **k,
        ),
        hidden,
        weight[block].clone().requires_grad_(),
        bias[block].clone().requires_grad_(),
        targets,
        mask,
        extra,
    )


def _own_chunk_rows(sizes, workspace_bytes):
    """The tokens per one-pass chunk each rank would plan from its own block alone (0: not even one fits)."""
    hidden, weight, bias = _apo_problem(sizes)[:3]
    rows = []
    for rank, size in enumerate(sizes):
        block = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        try:
            rows.append(
                plan.plan_sweep(
                    "one-pass",
                    hidden.view(-1, hidden.shape[-1]),
                    weight[block],
                    bias[block],
                    TORCH_ROW_PASS,
                    workspace_bytes,
                    needs_grad=(True, True),
                ).tile.rows
            )
        except ValueError:
            rows.append(0)
    return rows


@pytest.mark.parametrize(
    "sizes, level, largest_block_rows",
    [([23, 78], "token", 3), ([13, 5, 19], "token", 4), ([23, 78], "sequence", 8)],
    ids=["2-ranks", "3-ranks", "2-ranks-sequence-ratio"],
)
def test_vocab_parallel_ranks_agree_on_the_one_pass_chunks(sizes, level, largest_block_rows):
    """Uneven blocks and a workspace in which the largest block's chunk holds a few of the 24 tokens, the
    others' more: every rank runs the same chunks (hence the same per-chunk collectives), and the loss,
    log-probs, entropies and gradients equal one process's in float64. (Sequence ratios: a chunk holds the
    longest sequence, up to 8 tokens.)"""
    workspace = next(w for w in itertools.count(1024, 64) if min(_own_chunk_rows(sizes, w)) >= largest_block_rows)
    own_rows = _own_chunk_rows(sizes, workspace)
    assert len(set(own_rows)) > 1 and min(own_rows) < 24, own_rows  # the ranks' own plans disagree
    config = dataclasses.replace(APO_CONFIG, importance_sampling_level=level)
    hidden, weight, bias, targets, mask, extra = _apo_problem(sizes)
    exact = _apo_loss_grads(
        lambda *a, **k: reference.apo_loss(*a, config=config, **k),
        hidden,
        weight.requires_grad_(),
        bias.requires_grad_(),
        targets,
        mask,
        extra,
    )
    names = ("loss", "logps", "entropy", "d_hidden", "d_weight", "d_bias")
    for rank, got in enumerate(run_ranks(_one_pass_on_rank, len(sizes), sizes, config, workspace, timeout=90)):
        offset = sum(sizes[:rank])
        block = slice(offset, offset + sizes[rank])
        for name, g, e in zip(names, got, exact):
            assert_close(g, e[block] if name in ("d_weight", "d_bias") else e, 1e-12, f"rank {rank}: {name}")


def _bad_inputs_on_rank(rank, world_size):
    """Ranks that disagree on the tokens or the mask get a ValueError on every rank, not a hang."""
    hidden = torch.randn(5 + rank, 4, dtype=torch.float64)
    weight = torch.randn(6, 4, dtype=torch.float64)
    messages = []
    try:
        fused_linear_logprobs(
            hidden, weight, torch.zeros(5 + rank, dtype=torch.long), vocab_parallel_group=dist.group.WORLD
        )
    except ValueError as e:
        messages.append(str(e))
    mask = torch.ones(5, dtype=torch.bool)
    mask[rank] = False
    mask[3] = rank == 0
    try:
        fused_linear_logprobs(
            hidden[:5], weight, torch.zeros(5, dtype=torch.long), mask=mask, vocab_parallel_group=dist.group.WORLD
        )
    except ValueError as e:
        messages.append(str(e))
    try:  # a target beyond the whole vocabulary (2 x 6 rows), though within no rank's block either way
        fused_linear_logprobs(hidden[:5], weight, torch.full((5,), 12), vocab_parallel_group=dist.group.WORLD)
    except ValueError as e:
        messages.append(str(e))
    return messages


def test_vocab_parallel_rejects_ranks_that_disagree():
    for messages in run_ranks(_bad_inputs_on_rank, 2):
        assert len(messages) == 3, messages
        assert "disagree on tokens (hidden rows): [5, 6]" in messages[0]
        assert "disagree on unmasked tokens: [4, 3]" in messages[1]
        assert "targets must lie in [0, 12)" in messages[2]


def test_vocab_parallel_argument_errors():
    p = make_linear_problem(4, 3, 10, seed=0)
    with pytest.raises(ValueError, match="vocab_parallel_group is set but torch.distributed is not initialized"):
        fused_linear_logprobs(p.hidden, p.weight, p.targets, vocab_parallel_group=object())
