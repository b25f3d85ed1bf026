"""The 'apo' fused forward under Ulysses sequence parallelism 2 (2 gloo ranks) gives the per-token log-probs
and entropies of the run without it (verl users reported wrong log-probs with SP > 1 in verl's own fused
path: verl issues #3723, #6068).

What runs for real: verl's FSDP engine pads and slices the packed inputs, the rolled labels and our
``response_label_mask`` over the SP group, our fused head scores each rank's slice, and verl gathers and
unpads the outputs over the group (gloo). What is stood in: Ulysses attention itself. gloo runs its
all-to-all, but verl's Ulysses patch wraps transformers' flash-attention forward, which needs flash-attn on a
GPU; so each rank runs the base model on the whole packed sequence (gathered from the slices) and keeps the
hidden states of its slice, which is what Ulysses attention computes.
"""

import pytest

pytest.importorskip("verl")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPast  # noqa: E402
from verl.models.transformers.monkey_patch import apply_monkey_patch  # noqa: E402

import apo_kernels.integrations.verl as apo_verl  # noqa: E402
from tests.distributed import run_ranks  # noqa: E402

SP = 2
# (model, vocabulary, all-negative logits, (prompt lengths, response lengths)). Packed lengths 11 + 6 + 4
# = 21, padded to 22, put the slice boundary between two sequences; 8 + 3 + 3 = 14 puts it inside the first
# response (the last position of slice 0 predicts a response token that is the first token of slice 1).
CASES = [("qwen2", 1283, False, ((5, 2, 3), (6, 4, 1))), ("qwen2", 1000, True, ((2, 2, 2), (6, 1, 1)))]


def _gather_sequence(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def ulysses_stand_in(verl_base_forward):
    """verl's base-model forward on the whole sequence, returning this rank's slice of the hidden states."""

    def forward(self, input_ids=None, position_ids=None, **kwargs):
        local = input_ids.shape[-1]
        full_ids = _gather_sequence(input_ids)
        if position_ids is not None and position_ids.shape[-1] != full_ids.shape[-1]:
            position_ids = _gather_sequence(position_ids)
        hidden = verl_base_forward(self, input_ids=full_ids, position_ids=position_ids, **kwargs)[0]
        rank = dist.get_rank()
        return BaseModelOutputWithPast(last_hidden_state=hidden[:, rank * local : (rank + 1) * local])

    return forward


def scores(sp_size, kind, vocab, all_negative, lengths):
    from tests.integrations.verl import test_fused_forward as helpers

    model = helpers.tiny_model(kind, vocab, all_negative)
    apply_monkey_patch(model, use_remove_padding=False, use_fused_kernels=True, fused_kernels_backend="apo")
    micro_batch = helpers.engine_micro_batch(kind, vocab, True, *lengths)
    engine = helpers.fsdp_engine(model, True)
    engine.use_ulysses_sp = sp_size > 1
    engine.ulysses_sequence_parallel_size = sp_size
    with torch.no_grad():
        model_inputs, output_args = engine.prepare_model_inputs(micro_batch)
        raw = type(model).forward(model, **model_inputs, use_cache=False)
        out = engine.prepare_model_outputs(raw, output_args, micro_batch, logits_processor_func=None)
    mask = micro_batch["response_mask"].bool()
    log_probs = helpers.no_padding_2_padding(out["log_probs"], micro_batch)
    entropy = helpers.no_padding_2_padding(out["entropy"], micro_batch)
    return log_probs[mask], entropy[mask], model_inputs["response_label_mask"].sum()


def ulysses_on_rank(rank, world_size):
    from verl.models.transformers import monkey_patch
    from verl.utils.ulysses import set_ulysses_sequence_parallel_group

    monkey_patch.is_trl_available = lambda: False  # as in test_fused_forward: verl's TRL probe fails on TRL >= 1
    set_ulysses_sequence_parallel_group(dist.group.WORLD)
    apo_verl.fused_forward.forward_base_model = ulysses_stand_in(apo_verl.fused_forward.forward_base_model)
    return [scores(SP, *case) for case in CASES]


def test_ulysses_sp2_matches_no_sequence_parallelism(monkeypatch):
    from verl.models.transformers import monkey_patch

    monkeypatch.setattr(monkey_patch, "is_trl_available", lambda: False)
    per_rank = run_ranks(ulysses_on_rank, SP)
    for index, case in enumerate(CASES):
        log_probs, entropy, _ = scores(1, *case)
        for rank, results in enumerate(per_rank):
            sp_log_probs, sp_entropy, scored_rows = results[index]
            assert scored_rows < log_probs.numel(), "each rank should score only its slice's response tokens"
            torch.testing.assert_close(sp_log_probs, log_probs, rtol=1e-5, atol=1e-5, msg=f"{case}, rank {rank}")
            torch.testing.assert_close(sp_entropy, entropy, rtol=1e-5, atol=1e-5, msg=f"{case}, rank {rank}")
