"""A few APOTrainer steps on the tiny Qwen2.5-VL, the same global batch in one process or several.

    python distributed_train.py MODEL_DIR OUT_FILE                              # one process
    torchrun --nproc_per_node 2 distributed_train.py MODEL_DIR OUT_FILE          # DDP (gloo on CPU)
    torchrun --nproc_per_node 2 distributed_train.py MODEL_DIR OUT_FILE --zero3  # DeepSpeed ZeRO-3 (CPU)
    ... --top-entropy-quantile Q                                                   # entropy masking

Completions come from a deterministic ``rollout_func`` (a function of the prompt and of the completion's
place in its group), so every layout trains on the same data; everything else is TRL's own loop: the
sampler, the reward gathering and APO's group stage over all processes, the engine's gradient reduction,
SGD. Rank 0 writes the losses of each step and the final parameters to OUT_FILE. Used by
``test_distributed.py``.
"""

import argparse
import os
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[3]))  # the repository root: the tests and examples packages

from apo_kernels.integrations.trl import APOGRPOConfig, APOTrainer  # noqa: E402
from examples import trl_apo_qwen2_5_vl as example  # noqa: E402
from tests.integrations.trl.rollouts import deterministic_rollout  # noqa: E402
from tests.integrations.trl.test_apo_trainer import GROUP, image_dataset, length_reward  # noqa: E402

GLOBAL_BATCH = 2 * GROUP  # both prompts of the dataset, one group each
STEPS = 3
ZERO3 = {
    # threshold 0: partition every parameter (by default ZeRO-3 keeps ones under 1e5 elements, all of this
    # tiny model's, whole on every rank, and the head would never need gathering)
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0; the other layouts do not clip
    "bf16": {"enabled": False},
}


def full_parameters(model, zero3: bool) -> dict:
    gathered = nullcontext()
    if zero3:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(model.parameters()))
    with gathered:
        return {name: p.detach().clone() for name, p in model.named_parameters()}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out_file")
    parser.add_argument("--zero3", action="store_true")
    parser.add_argument("--top-entropy-quantile", type=float, default=1.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.zero3:
        import deepspeed.ops

        # At init DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (minutes of C++ on a fresh
        # machine); without it the reductions go through gloo, the same numbers.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    with tempfile.TemporaryDirectory() as output_dir:
        config = APOGRPOConfig(
            output_dir=output_dir,
            report_to="none",
            use_cpu=True,
            bf16=False,
            seed=0,
            save_strategy="no",
            num_generations=GROUP,
            max_completion_length=8,
            per_device_train_batch_size=GLOBAL_BATCH // world_size,
            gradient_accumulation_steps=1,
            max_steps=STEPS,
            logging_steps=1,
            optim="sgd",
            learning_rate=0.5,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            beta=0.05,
            use_bias_correction_kl=False,
            deepspeed=ZERO3 if args.zero3 else None,
            top_entropy_quantile=args.top_entropy_quantile,
        )
        os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
        trainer = APOTrainer(
            model=args.model_dir,
            reward_funcs=[length_reward],
            args=config,
            train_dataset=image_dataset(),
            processing_class=example.build_tiny_processor(),
            rollout_func=deterministic_rollout,
        )
        head = trainer.model.get_output_embeddings().weight
        head_name = next(name for name, p in trainer.model.named_parameters() if p is head)  # tied: the embedding
        initial_head = full_parameters(trainer.model, args.zero3)[head_name]
        trainer.train()
        params = full_parameters(trainer.model, args.zero3)
        if trainer.accelerator.is_main_process:
            losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
            advantages = list(trainer._logs["advantages"])
            torch.save(
                {
                    "losses": losses,
                    "params": params,
                    "advantages": advantages,
                    "world_size": world_size,
                    "head_name": head_name,
                    "initial_head": initial_head,
                },
                args.out_file,
            )
    if torch.distributed.is_initialized():
        # Left to interpreter teardown, gloo's threads can abort a rank after its work is done
        # ("terminate called without an active exception", SIGABRT): end the process group first.
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
