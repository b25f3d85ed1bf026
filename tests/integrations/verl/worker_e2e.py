"""verl 0.9.1's real actor worker trains with the APO adapter, below Ray: the recipe's path end to end on tiny models.

    python tests/integrations/verl/worker_e2e.py [--model qwen2_5_vl|qwen2] [--ranks 1|2] [--samples 6]
        [--steps 2] [--env NAME=VALUE ...] [--output FILE] [HYDRA_OVERRIDE ...]

What runs is verl's own code: its Hydra config composed with the recipe's overrides, parsed from
``examples/verl/run_qwen2_5_vl_3b_apo.sh`` as its shell runs them (``MODEL`` = a tiny random Qwen2.5-VL or Qwen2,
``NGPUS`` = ``--ranks``), the tiny-run overrides below, then the command line's; the recipe's exported environment
(``--env`` replaces a variable); ``ActorRolloutRefWorker`` with roles ``actor`` and ``ref`` (FSDP2 over ``--ranks``
gloo processes); and the v1 trainer's step methods (``PPOTrainer._balance_batch`` with verl's batch padding,
``_compute_old_log_prob``, ``_compute_ref_log_prob``, ``_compute_advantage``, which calls the APO estimator,
``_update_actor``), each rank running them as the trainer does. Stood in: Ray and TransferQueue (an in-process
key-value store that packs fields as TransferQueue's storage manager does: nested jagged tensors and non-tensor
stacks, every persisted field handed to the worker) and the rollout (``AgentLoopOutput``s of made-up responses,
with fixed rewards, post-processed into fields as ``AgentLoopWorkerTQ`` does).

It prints one JSON object (``--output`` also writes it, with every final parameter value): per step the worker's
update metrics (``grad_norm`` and ``loss`` per mini-batch, the loss's metrics) and the estimator's KL weight per
sample; per update micro-batch the KL weights (``returns``) the loss received; the final parameters' checksums and
the largest parameter change. Tests compare runs (``test_worker_e2e.py``).

Without CUDA (CI) it applies the CPU shims of ``cpu_shims.py`` (a CPU platform for verl, SDPA for flash-attn, ...).
With CUDA it applies none and verl runs as on a GPU node: a one-minute check of the Triton kernels inside verl, e.g.
``--env APO_VERL_KL_AGG_MODE=token-mean algorithm.apo.dads=False algorithm.apo.stcr=False`` against the same with
``actor_rollout_ref.actor.policy_loss.loss_mode=vanilla actor_rollout_ref.model.use_fused_kernels=False``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).parents[3]))  # the repository root: the tests and examples packages

from tests.distributed import run_ranks  # noqa: E402
from tests.integrations.verl.recipe import recipe_overrides  # noqa: E402

CUDA = torch.cuda.is_available()
CPU_SHIMS_MODULE = "tests.integrations.verl.cpu_shims"
# verl's device must be known when verl is imported (see cpu_shims): the shims come in through verl's own import.
CPU_ENVIRONMENT = {
    "VERL_PLATFORM": "cpu",
    "VERL_ENGINE_DEVICE": "cuda",  # verl registers its FSDP engines for cuda and npu only
    "VERL_USE_EXTERNAL_MODULES": f"{CPU_SHIMS_MODULE},apo_kernels.integrations.verl",
}
CPU_OVERRIDES = ["+actor_rollout_ref.model.override_config.attn_implementation=sdpa"]  # no flash-attn on the CPU
GROUP_SIZE = 4  # rollout.n
# Outcome reward of each response of prompt 0 and prompt 1: two and one correct answers, for DADS's difficulties.
REWARDS = ((1.0, 1.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0))
# Two prompts of four responses; float32 (an exact comparison); the update: mini-batches of one prompt's group
# (4 samples: two optimizer steps per trainer step), micro-batches of 2 per rank; log-probs in micro-batches of 4.
TINY_OVERRIDES = [
    "data.train_batch_size=2",
    f"actor_rollout_ref.rollout.n={GROUP_SIZE}",
    "actor_rollout_ref.actor.ppo_mini_batch_size=1",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.actor.optim.lr=1e-3",  # updates well above the comparisons' tolerance
    # FSDP's parameter dtype, which is also the engine's autocast dtype (default bf16)
    "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
    "+actor_rollout_ref.ref.fsdp_config.mixed_precision.param_dtype=fp32",
    "actor_rollout_ref.actor.use_torch_compile=False",
    "actor_rollout_ref.ref.use_torch_compile=False",
]


def build_models(kind: str, directory: str) -> str:
    """Save the tiny random model of ``kind`` with its tokenizer (and processor) under ``directory``; its path."""
    from transformers import Qwen2ForCausalLM

    from tests.tiny_models import tiny_qwen2_config

    from examples import trl_apo_qwen2_5_vl as example

    processor = example.build_tiny_processor()
    path = os.path.join(directory, kind)
    if kind == "qwen2_5_vl":
        model = example.build_tiny_model(processor, seed=0)
        processor.save_pretrained(path)
    else:
        tokenizer = processor.tokenizer
        config = tiny_qwen2_config(
            len(tokenizer),
            max_position_embeddings=512,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
        tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return path


# Rank side: everything below imports verl only inside functions, after the environment is set ------------------


def rollout_samples(kind: str, num_samples: int) -> tuple[list[str], list[dict], list[dict]]:
    """``(keys, fields, tags)`` of ``num_samples`` responses as ``AgentLoopWorkerTQ._agent_loop_postprocess`` writes
    them to TransferQueue: prompt 0's group, then prompt 1's (fewer responses if ``num_samples < 8``)."""
    from PIL import Image
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput
    from verl.models.transformers.qwen2_vl import get_rope_index

    from examples import trl_apo_qwen2_5_vl as example

    processor = example.build_tiny_processor()
    tokenizer = processor.tokenizer
    words = tokenizer.convert_tokens_to_ids(["it", "is", "the", "picture", "a", "of", *example.TINY_COLOURS])
    generator = torch.Generator().manual_seed(0)
    keys, fields, tags = [], [], []
    for index in range(num_samples):
        prompt, session = divmod(index, GROUP_SIZE)
        uid = f"prompt{prompt}"
        if kind == "qwen2_5_vl":
            content = [{"type": "image"}, {"type": "text", "text": "what colour is the picture ?"}]
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
            colour = (40 + 90 * prompt, 200 - 90 * prompt, 60)
            image = Image.new("RGB", (example.TINY_IMAGE_SIZE, example.TINY_IMAGE_SIZE), colour)
            processed = processor(text=[text], images=[image], return_tensors="pt")
            prompt_ids = processed["input_ids"][0]
            grid = processed["image_grid_thw"]
            multi_modal_inputs = {
                "pixel_values": processed["pixel_values"],
                "image_grid_thw": grid,
                "images_seqlens": torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0]),
            }
        else:
            messages = [{"role": "user", "content": "what colour is the picture ?"}]
            prompt_ids = torch.tensor(
                tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            )
            multi_modal_inputs = {}
        length = int(torch.randint(3, 9, (1,), generator=generator))
        response_ids = [words[i] for i in torch.randint(0, len(words), (length,), generator=generator)]
        output = AgentLoopOutput(
            prompt_ids=prompt_ids.tolist(),
            response_ids=response_ids,
            response_mask=[1] * length,
            response_logprobs=(-torch.rand(length, generator=generator)).tolist(),
            reward_score=REWARDS[prompt][session],
            num_turns=2,
            metrics=AgentLoopMetrics(),
        )
        field = output.as_dict()
        field.update(uid=uid, session_id=session)
        field.pop("multi_modal_data", None)
        field["loss_mask"] = field["response_mask"]
        field["input_ids"] = torch.cat([field["prompts"], field["responses"]])
        sequence_length = field["input_ids"].numel()
        text_positions = torch.arange(sequence_length)
        if kind == "qwen2_5_vl":  # verl's layout: (text, t, h, w) rows
            vision_positions = get_rope_index(processor, field["input_ids"], image_grid_thw=grid)
            field["position_ids"] = torch.cat([text_positions[None], vision_positions])
        else:
            field["position_ids"] = text_positions
        field["multi_modal_inputs"] = multi_modal_inputs
        keys.append(f"{uid}_{session}_0")
        fields.append(field)
        prompt_len = field["prompts"].numel()
        tags.append(
            {
                "status": "success",
                "prompt_len": prompt_len,
                "response_len": length,
                "seq_len": sequence_length,
                "global_steps": 1,
            }
        )
    return keys, fields, tags


def unpack_rows(data) -> list[dict]:
    """Per-sample field values of a batch ``TensorDict`` (nested or dense tensors, non-tensor stacks)."""
    from tensordict import NonTensorData, NonTensorStack

    columns = {}
    for name in data.keys():
        value = data.get(name)
        if isinstance(value, NonTensorData):  # batch-level metadata, not a field
            continue
        columns[name] = value.tolist() if isinstance(value, NonTensorStack) else list(value.unbind(0))
    return [{name: column[i] for name, column in columns.items()} for i in range(data.batch_size[0])]


class TransferQueueStandIn:
    """TransferQueue's key-value calls that verl's trainer and batch padding make, in this process: fields stored
    per sample, read back packed as TransferQueue's storage manager packs them; ``kv_batch_put`` returns the
    ``KVBatchMeta`` of every persisted field, which is what the worker is handed; fields never written are left
    out of a read (the trainer asks for ``values`` without a critic)."""

    def __init__(self):
        self.rows: dict[str, dict] = {}
        self.tags: dict[str, dict] = {}

    def put_rows(self, keys, rows, tags=None):
        from transfer_queue import KVBatchMeta

        for key, row in zip(keys, rows):
            self.rows.setdefault(key, {}).update(row)
        self.tags.update(zip(keys, tags or []))
        fields = sorted(set().union(*(self.rows[key].keys() for key in keys)))
        return KVBatchMeta(
            keys=list(keys),
            tags=[self.tags.get(key, {}) for key in keys],
            partition_id="train",
            fields=fields,
            extra_info={},
        )

    def kv_batch_put(self, keys, partition_id=None, fields=None, tags=None):
        return self.put_rows(keys, unpack_rows(fields), tags)

    def kv_batch_get(self, keys, partition_id=None, select_fields=None):
        from tensordict import TensorDict
        from transfer_queue.storage.managers.simple_storage_manager import AsyncSimpleStorageManager

        stored = self.rows[keys[0]]
        names = sorted(stored) if select_fields is None else [name for name in select_fields if name in stored]
        pack = AsyncSimpleStorageManager._pack_field_values
        return TensorDict(
            {name: pack([self.rows[key][name] for key in keys]) for name in names}, batch_size=[len(keys)]
        )


class WorkerGroupStandIn:
    """A Ray worker group as the trainer calls it, seen from one rank: this rank's share of the batch (verl's
    dispatch splits it in DP-rank order) goes to the local worker as verl's ``tqbridge`` hands it (the meta's
    fields, its ``extra_info`` as non-tensor data); tensor outputs of every rank go back to the store."""

    def __init__(self, worker, store: TransferQueueStandIn, update_metrics: list):
        import torch.distributed as dist

        self.worker, self.store, self.update_metrics = worker, store, update_metrics
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self._dispatch_info = {"actor": list(range(self.size))}

    def _run(self, method: str, meta):
        from verl.utils import tensordict_utils as tu

        share = len(meta) // self.size
        keys = meta.keys[self.rank * share : (self.rank + 1) * share]
        data = self.store.kv_batch_get(keys, meta.partition_id, select_fields=meta.fields)
        tu.assign_non_tensor(data, **meta.extra_info)
        return keys, getattr(self.worker, method)(data)

    def _compute(self, method: str, meta):
        import torch.distributed as dist

        keys, output = self._run(method, meta)
        shares = [None] * self.size
        dist.all_gather_object(shares, (keys, unpack_rows(output)))
        for share_keys, rows in shares:
            self.store.put_rows(share_keys, rows)
        return self.store.put_rows(meta.keys, [{}] * len(meta))

    def compute_log_prob(self, meta):
        return self._compute("compute_log_prob", meta)

    def compute_ref_log_prob(self, meta):
        return self._compute("compute_ref_log_prob", meta)

    def update_actor(self, meta):
        from verl.utils import tensordict_utils as tu

        _, output = self._run("update_actor", meta)
        self.update_metrics.append(tu.get(output, "metrics"))
        return output


def trainer_steps(config, tokenizer, actor_group, ref_group):
    """verl's v1 ``PPOTrainer`` step methods on an object with the attributes they read."""
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    class TrainerSteps:
        _get_required_batch_multiple = PPOTrainer._get_required_batch_multiple
        _balance_batch = PPOTrainer._balance_batch
        _compute_old_log_prob = PPOTrainer._compute_old_log_prob
        _compute_ref_log_prob = PPOTrainer._compute_ref_log_prob
        _compute_advantage = PPOTrainer._compute_advantage
        _update_actor = PPOTrainer._update_actor

    steps = TrainerSteps()
    steps.config, steps.tokenizer = config, tokenizer
    steps.actor_rollout_wg, steps.ref_policy_wg = actor_group, ref_group
    steps.ref_in_actor, steps.use_critic, steps.global_steps = False, False, 1
    return steps


def sample_kl_weights(rows: list[dict]) -> list[dict]:
    """``uid``, ``session_id`` and KL weight (``returns`` on the response tokens; None without any) of each sample."""
    weights = []
    for row in rows:
        on_response = row["returns"][row["response_mask"].bool()].unique().tolist()
        if len(on_response) > 1:
            raise AssertionError(f"one KL weight per response expected, got {on_response}")
        session = row["session_id"]
        weights.append({"uid": row["uid"], "session_id": int(session), "weight": (on_response or [None])[0]})
    return weights


def recording_forward_step(forward_step, seen: list):
    """The engine's ``forward_step``, recording the KL weights of each update micro-batch it receives. The loss
    function itself stays the one the worker bound: the adapter computes the update's loss in the forward only for
    that function."""

    def step(micro_batch, loss_function, forward_only):
        if not forward_only:
            fields = micro_batch.select("uid", "session_id", "returns", "response_mask")
            seen.append(sample_kl_weights(unpack_rows(fields)))
        return forward_step(micro_batch, loss_function=loss_function, forward_only=forward_only)

    return step


def full_parameters(module) -> dict[str, torch.Tensor]:
    """Every parameter, gathered from its FSDP2 shards (a collective: all ranks call it)."""
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().cpu().clone()
        for name, p in module.named_parameters()
    }


def train_on_rank(
    rank: int, world_size: int, kind: str, model_path: str, overrides: list[str], num_samples: int, num_steps: int
) -> dict:
    import torch.distributed as dist

    import verl  # noqa: F401  (first: it imports the CPU shims, when listed, before the adapter)

    if not CUDA:
        from tests.integrations.verl import cpu_shims

        cpu_shims.install()
    from verl.models.transformers import monkey_patch
    from verl.trainer.ppo import padding_utils
    from verl.trainer.ppo.v1 import trainer_base
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from tests.integrations.verl.recipe import compose_recipe

    # verl's model patching imports TRL's value-head class when TRL is installed, which TRL >= 1 (the trl extra of
    # this repository's test environment) removed; this run uses no TRL class (as in test_fused_forward).
    monkey_patch.is_trl_available = lambda: False
    # The process group is up (run_ranks); verl's Worker only records these.
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="0"
    )
    config = compose_recipe(overrides)
    actor = ActorRolloutRefWorker(config.actor_rollout_ref, role="actor")
    actor.init_model()
    ref = ActorRolloutRefWorker(config.actor_rollout_ref, role="ref")
    ref.init_model()
    loss_kl_weights = []
    bound_loss = actor.loss_fn.func
    engine = actor.actor.engine
    engine.forward_step = recording_forward_step(engine.forward_step, loss_kl_weights)

    store = TransferQueueStandIn()
    trainer_base.tq = padding_utils.tq = store
    update_metrics = []
    steps = trainer_steps(
        config,
        actor.actor.engine.model_config.tokenizer,
        WorkerGroupStandIn(actor, store, update_metrics),
        WorkerGroupStandIn(ref, store, []),
    )
    keys, fields, tags = rollout_samples(kind, num_samples)
    initial = full_parameters(actor.actor.engine.module)
    results = []
    for _ in range(num_steps):
        metrics = {}
        batch = store.put_rows(keys, fields, tags)
        batch = steps._balance_batch(batch, metrics)
        batch = steps._compute_old_log_prob(batch, metrics)
        batch = steps._compute_ref_log_prob(batch, metrics)
        batch = steps._compute_advantage(batch, metrics)
        estimator_weights = sample_kl_weights([store.rows[key] for key in batch.keys])
        steps._update_actor(batch, metrics)
        worker_metrics = update_metrics[-1]
        results.append(
            {
                "samples": len(batch),
                "grad_norm": worker_metrics["grad_norm"],
                "loss": worker_metrics["loss"],
                "metrics": {name: value for name, value in metrics.items() if name.startswith("actor/")},
                "estimator_kl_weights": estimator_weights,
            }
        )
    final = full_parameters(actor.actor.engine.module)
    dist.barrier()
    return {
        "rank": rank,
        "loss_function": f"{bound_loss.__module__}.{bound_loss.__qualname__}",
        "steps": results,
        "loss_kl_weights": loss_kl_weights,
        "max_parameter_change": max((final[name] - initial[name]).abs().max().item() for name in final),
        "parameter_checksums": {name: [p.sum().item(), p.abs().sum().item()] for name, p in final.items()},
        "parameters": {name: p.flatten().tolist() for name, p in final.items()},
    }


# Launcher ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def environment(variables: dict[str, str]):
    """The variables set for the ranks spawned inside (they inherit this process's environment), then restored."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run(
    kind: str = "qwen2_5_vl",
    ranks: int = 1,
    overrides: tuple[str, ...] = (),
    env: Optional[dict] = None,
    num_samples: int = 2 * GROUP_SIZE,
    num_steps: int = 2,
    timeout: float = 300.0,
) -> dict:
    """Train ``num_steps`` trainer steps in ``ranks`` gloo processes; rank 0's result plus every rank's
    micro-batch KL weights (``loss_kl_weights_per_rank``)."""
    with tempfile.TemporaryDirectory() as directory:
        model_path = build_models(kind, directory)
        exported, recipe = recipe_overrides(MODEL=model_path, NGPUS=str(ranks), NNODES="1", SP="1")
        all_overrides = recipe + TINY_OVERRIDES + ([] if CUDA else CPU_OVERRIDES) + list(overrides)
        variables = {**exported, **(env or {}), **({} if CUDA else CPU_ENVIRONMENT)}
        with environment(variables):
            per_rank = run_ranks(
                train_on_rank, ranks, kind, model_path, all_overrides, num_samples, num_steps, timeout=timeout
            )
    result = per_rank[0]
    result["loss_kl_weights_per_rank"] = [rank_result["loss_kl_weights"] for rank_result in per_rank]
    return result


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["qwen2_5_vl", "qwen2"], default="qwen2_5_vl")
    parser.add_argument("--ranks", type=int, choices=[1, 2], default=1, help="data-parallel gloo/nccl processes")
    parser.add_argument(
        "--samples",
        type=int,
        default=2 * GROUP_SIZE,
        help="rollout samples (< 8: verl's batch padding fills the mini-batch)",
    )
    parser.add_argument("--steps", type=int, default=2, help="trainer steps on the same rollout")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment of the ranks over the recipe's exports, e.g. APO_VERL_KL_AGG_MODE=token-mean",
    )
    parser.add_argument("--output", help="also write the JSON here, with every final parameter value")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides after the recipe's and the tiny run's")
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    result = run(args.model, args.ranks, tuple(args.overrides), env, args.samples, args.steps)
    if args.output:
        Path(args.output).write_text(json.dumps(result))
    print(json.dumps({name: value for name, value in result.items() if name != "parameters"}, indent=1))
    return result


if __name__ == "__main__":
    main()
