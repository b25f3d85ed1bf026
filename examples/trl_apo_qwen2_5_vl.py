"""Train Qwen2.5-VL with APO through TRL: ``APOTrainer`` in place of ``GRPOTrainer``.

Real run (Qwen2.5-VL-3B-Instruct on an image-question dataset with verifiable answers)::

    pip install torch torchvision 'apo-kernels[trl]'   # the CUDA builds; Qwen2.5-VL's processor needs torchvision
    accelerate launch examples/trl_apo_qwen2_5_vl.py --output-dir runs/apo-qwen2.5-vl-3b

  GPU: written for 8 x 80 GB (A100/H100) with bf16 and gradient checkpointing, one process per GPU; a single
  80 GB GPU also runs it with the default per-device batch (8 completions per prompt, 1024 new tokens), slowly.
  The policy, the reference model and generation share each GPU (no vLLM needed). The model and the dataset
  (``lmms-lab/multimodal-open-r1-8k-verified``) download from the Hugging Face Hub on first use.

Tiny run (CPU, no download, seconds; no torchvision needed): a small random Qwen2.5-VL built from a config, a
tokenizer and processor made locally, and a synthetic "what colour is the picture?" dataset, trained for a few
steps::

    pip install torch==2.13.0 && pip install -e '.[trl]'
    python examples/trl_apo_qwen2_5_vl.py --tiny --output-dir /tmp/apo-tiny

Both runs end with a summary (steps, final loss, mean reward, KL, the policy's log-probs from ``apo_loss`` against
the reference model's from TRL, how many parameter tensors changed, where the results were saved) and exit with
status 1 when a check fails: a non-finite loss, no optimizer step, no parameter change, or (float32 runs) policy
and reference log-probs that disagree before the first update, when both models still hold the same weights.

Checkpoints: ``OUTPUT_DIR/checkpoint-N`` every ``--save-steps`` steps (tiny: 1, real: 100; the last two kept)
and at the last step, with the processor, optimizer and RNG states; ``--resume`` continues from the last one,
e.g. ``--tiny --max-steps 4 --resume`` after a 2-step run trains steps 3 and 4 exactly as an uninterrupted
4-step run would. ``Qwen2_5_VLForConditionalGeneration.from_pretrained`` loads a checkpoint or
``OUTPUT_DIR/final``; so does ``AutoTokenizer``. (``AutoProcessor`` needs torchvision; without it, the tiny
processor is ``build_tiny_processor()``, which always builds the same one.)

Rewards follow the paper: accuracy (1 when the answer is right) plus a format bonus (0.5 for
``<think>...</think><answer>...</answer>``); a response is *correct* for STCR/DADS when its total reward is >= 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

MODEL_ID = "Qwen/Qwen2.5-VL-3B-Instruct"
DATASET_ID = "lmms-lab/multimodal-open-r1-8k-verified"
SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question about an image, and the Assistant "
    "solves it. The Assistant first thinks about the reasoning process and then gives the answer. The reasoning "
    "and the answer are enclosed in <think> </think> and <answer> </answer> tags: "
    "<think> reasoning here </think><answer> answer here </answer>"
)

# Rewards ------------------------------------------------------------------------------------------------------

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


def _text(completion) -> str:
    """The text of a completion, conversational (a list of messages) or plain."""
    return completion[-1]["content"] if isinstance(completion, list) else completion


def extract_answer(text: str) -> str:
    """The content of the last ``<answer>`` tag, or the last word when there is no tag."""
    tagged = _ANSWER.findall(text)
    if tagged:
        return tagged[-1]
    words = text.split()
    return words[-1] if words else ""


def _normalize(answer: str) -> str:
    return " ".join(answer.strip().strip(".").lower().split())


def accuracy_reward(completions, solution, **kwargs) -> list[float]:
    """1.0 when the completion's answer equals the reference answer (after normalization), else 0.0."""
    return [
        float(_normalize(extract_answer(_text(c))) == _normalize(extract_answer(s)))
        for c, s in zip(completions, solution)
    ]


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 for ``<think>...</think><answer>...</answer>`` (weighted 0.5 in the total reward), else 0.0."""
    return [float(bool(_FORMAT.match(_text(c)))) for c in completions]


REWARD_FUNCS = [accuracy_reward, format_reward]
REWARD_WEIGHTS = [1.0, 0.5]  # total = accuracy + 0.5 * format; correct when total >= 1

# Tiny mode: model, processor and data made locally -------------------------------------------------------------

TINY_COLOURS = ("red", "green", "blue")
_TINY_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
_TINY_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
_TINY_WORDS = ["<unk>", "system", "user", "assistant", "what", "colour", "is", "the", "picture", "?", "it", "a", "of"]
_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_IMAGE_SIZE = 16  # pixels; with 4-pixel patches merged 2 x 2, one image is 4 tokens


def build_tiny_processor():
    """A Qwen2.5-VL processor with a small word-level tokenizer, made without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    vocab = {token: i for i, token in enumerate(_TINY_SPECIAL + _TINY_TAGS + _TINY_WORDS + list(TINY_COLOURS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(_TINY_SPECIAL)
    backend.add_tokens(_TINY_TAGS)  # whole tags, not split at their punctuation
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        padding_side="left",
        chat_template=_TINY_CHAT_TEMPLATE,
    )
    pixels = TINY_IMAGE_SIZE * TINY_IMAGE_SIZE
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=pixels, max_pixels=pixels
    )
    try:
        return Qwen2_5_VLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=_tiny_video_processor(),
            chat_template=_TINY_CHAT_TEMPLATE,
        )
    except AttributeError as error:  # transformers >= 5.19 builds no Qwen2.5-VL processor without torchvision
        import transformers
        from transformers.utils import is_torchvision_available

        if is_torchvision_available() or "_extra_content" not in str(error):
            raise
        raise RuntimeError(
            f"transformers {transformers.__version__} cannot build a Qwen2.5-VL processor without torchvision "
            f"({error}); install the versions the trl extra pins (pip install -e '.[trl]': transformers < 5.19) "
            "or the torchvision build that matches your torch"
        ) from error


def _tiny_video_processor():
    """Qwen2.5-VL's processor insists on a video processor, whose real class needs torchvision; without it,
    transformers only offers a placeholder class, which is enough here since the tiny data has no video."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers.models.qwen2_vl import Qwen2VLVideoProcessor

        return Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2)
    from transformers.utils import PushToHubMixin

    placeholder = Qwen2_5_VLProcessor.get_possibly_dynamic_module("BaseVideoProcessor")

    class NoVideoProcessor(placeholder, PushToHubMixin):
        """Saved as an empty entry of ``processor_config.json``, so that checkpoints save the processor."""

        _auto_class = None

        def __init__(self):  # the placeholder's __init__ only raises "requires torchvision"
            pass

        def to_dict(self) -> dict:
            return {}

    return NoVideoProcessor()


def build_tiny_model(processor, seed: int = 0):
    """A random two-layer Qwen2.5-VL (vision tower included) sized for the tiny processor; LM head tied, as in 3B."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = processor.tokenizer
    token = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
            bos_token_id=token("<|endoftext|>"),
            eos_token_id=token("<|im_end|>"),
            pad_token_id=token("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=16,
            out_hidden_size=32,
            fullatt_block_indexes=[1],
        ),
        image_token_id=token("<|image_pad|>"),
        video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"),
        vision_end_token_id=token("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model


def tiny_dataset(num_prompts: int = 8, seed: int = 0):
    """Synthetic image questions: a plain-coloured picture, "what colour is the picture ?", its colour."""
    import random

    from datasets import Dataset
    from PIL import Image

    rgb = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220)}
    rng = random.Random(seed)
    colours = [rng.choice(TINY_COLOURS) for _ in range(num_prompts)]
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": "what colour is the picture ?"}] for _ in colours],
            "image": [Image.new("RGB", (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), rgb[c]) for c in colours],
            "solution": list(colours),
        }
    )


def save_tiny_model(processor, output_dir: str, seed: int = 0) -> str:
    """Build the tiny model and save it under ``output_dir``, returning the path: TRL loads the reference
    model from the policy's path."""
    path = os.path.join(output_dir, "tiny-qwen2.5-vl")
    build_tiny_model(processor, seed).save_pretrained(path)
    return path


# Runs ----------------------------------------------------------------------------------------------------------


def real_dataset():
    from datasets import load_dataset

    dataset = load_dataset(DATASET_ID, split="train")

    def to_prompt(example):
        return {
            "prompt": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": example["problem"]},
            ]
        }

    return dataset.map(to_prompt)


def apo_args(output_dir: str, tiny: bool, max_steps: Optional[int], save_steps: Optional[int] = None):
    from apo_kernels.integrations.trl import APOGRPOConfig

    # APO fields at the released View-R1 values: DADS + STCR, beta 1e-3, token-mean policy term
    # (loss_type="bnpo") and a per-sequence KL term.
    apo = dict(
        dads=True,
        stcr=True,
        beta=1e-3,
        loss_type="bnpo",
        kl_agg_mode="seq-mean-token-mean",
        reward_weights=REWARD_WEIGHTS,
        correctness_threshold=1.0,
        output_dir=output_dir,
        report_to="none",
        logging_steps=1,
        save_strategy="steps",  # checkpoint-N/ every save_steps and at the last step: --resume continues from it
        save_steps=save_steps or (1 if tiny else 100),
        save_total_limit=2,  # a 3B model's checkpoint holds ~36 GB of weights and Adam state
        disable_tqdm=False,  # the progress bar, whatever the log level
    )
    if tiny:
        return APOGRPOConfig(
            **apo,
            max_steps=max_steps or 2,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            num_generations=4,  # 2 prompts x 4 completions per optimizer step, split over 2 micro-batches
            max_completion_length=12,
            learning_rate=1e-2,
            lr_scheduler_type="constant",  # so that --resume with a larger --max-steps continues the same run
            use_cpu=True,
            bf16=False,
            seed=0,
            dataloader_num_workers=0,
        )
    return APOGRPOConfig(
        **apo,
        max_steps=max_steps or -1,
        num_train_epochs=1,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        num_generations=8,  # G = 8, as in the paper
        max_completion_length=1024,
        learning_rate=1e-6,
        bf16=True,
        gradient_checkpointing=True,
        model_init_kwargs={"dtype": "bfloat16"},
    )


# Summary and checks ---------------------------------------------------------------------------------------------

#: Before the first update the policy and the reference model hold the same weights: in float32 their log-probs
#: (apo_loss's fused head against TRL's forward of the reference model) agree to rounding.
SAME_WEIGHTS_LOGP_TOL = 1e-4


class RunFailed(RuntimeError):
    """A run that finished but failed a check of :func:`summarize`."""


class LogpComparison:
    """A forward hook on the policy: for every loss forward, the policy's per-token log-probs (returned by
    apo_loss) against the reference model's (computed by TRL when the batch was generated), grouped by the
    optimizer step they were taken at (step 0: before any update)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.by_step: dict[int, list[tuple[float, float, float]]] = {}  # step -> [(sum |d|, tokens, max |d|)]
        self.handle = trainer.model.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, output):
        apo_inputs = kwargs.get("apo_inputs")
        if apo_inputs is None or apo_inputs.ref_logps is None or getattr(output, "log_probs", None) is None:
            return
        mask = apo_inputs.mask.bool()
        delta = (output.log_probs.float() - apo_inputs.ref_logps.float()).abs()[mask]
        if delta.numel():
            stats = (delta.sum().item(), float(delta.numel()), delta.max().item())
            self.by_step.setdefault(self.trainer.state.global_step, []).append(stats)

    def step_stats(self, step: int) -> Optional[tuple[float, float]]:
        """(mean, max) |policy logp - reference logp| over the completion tokens of one optimizer step."""
        rows = self.by_step.get(step)
        if not rows:
            return None
        return sum(r[0] for r in rows) / sum(r[1] for r in rows), max(r[2] for r in rows)


@dataclass
class RunSummary:
    steps: int
    final_loss: Optional[float]
    losses: list = field(default_factory=list)
    rewards: list = field(default_factory=list)
    final_kl: Optional[float] = None
    logp_first: Optional[tuple] = None  # (step, mean |dlogp|, max |dlogp|)
    logp_last: Optional[tuple] = None
    params_changed: Optional[tuple] = None  # (changed tensors, compared tensors, max |delta|)
    saved: list = field(default_factory=list)
    failures: list = field(default_factory=list)

    @property
    def mean_reward(self) -> Optional[float]:
        return sum(self.rewards) / len(self.rewards) if self.rewards else None

    def lines(self, title: str) -> list[str]:
        def num(x):
            return "n/a" if x is None else f"{x:.4g}"

        out = [f"== {title} summary =="]
        out.append(f"steps: {self.steps} optimizer steps, {len(self.losses)} logged")
        finite = all(math.isfinite(x) for x in self.losses)
        out.append(f"final loss: {num(self.final_loss)} (logged losses {'all finite' if finite else 'NOT all finite'})")
        last_reward = self.rewards[-1] if self.rewards else None
        out.append(
            f"mean reward: {num(self.mean_reward)} over {len(self.rewards)} steps (last step {num(last_reward)})"
        )
        out.append(f"KL(policy || reference), last step: {num(self.final_kl)}")
        if self.logp_first is None:
            out.append("policy vs reference log-probs: not compared (no reference model: beta = 0)")
        else:
            first, last = self.logp_first, self.logp_last
            before = " (before any update, same weights)" if first[0] == 1 else " (first step of this session)"
            out.append(
                f"policy vs reference log-probs, mean |dlogp| per completion token: step {first[0]}{before} "
                f"{num(first[1])} (max {num(first[2])}); step {last[0]} {num(last[1])} (max {num(last[2])})"
            )
        if self.params_changed is None:
            out.append("parameters changed: not checked (no unsharded reference model to compare with)")
        else:
            changed, total, delta = self.params_changed
            out.append(
                f"parameters changed: {changed}/{total} tensors differ from the reference model "
                f"(max |delta| {num(delta)})"
            )
        out.append("saved: " + (", ".join(self.saved) if self.saved else "nothing"))
        out.append("result: " + ("FAILED: " + "; ".join(self.failures) if self.failures else "OK"))
        return out


def parameter_change(trainer) -> Optional[tuple[int, int, float]]:
    """How many of the policy's parameter tensors differ from the reference model's (its initial weights)."""
    import torch

    if trainer.ref_model is None or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return None
    reference = dict(trainer.accelerator.unwrap_model(trainer.ref_model).named_parameters())
    changed = total = 0
    max_delta = 0.0
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            ref = reference.get(name)
            if ref is None or ref.shape != param.shape:
                continue
            delta = (param.detach().float() - ref.detach().to(param.device).float()).abs().max().item()
            total += 1
            changed += delta > 0
            max_delta = max(max_delta, delta)
    return (changed, total, max_delta) if total else None


def summarize(trainer, logps: Optional[LogpComparison], check_same_weights: bool) -> RunSummary:
    """The run's summary from the trainer's logs, with the checks that decide the exit status."""
    steps = [log for log in trainer.state.log_history if "loss" in log]
    losses = [float(log["loss"]) for log in steps]
    kls = [float(log["kl"]) for log in steps if "kl" in log]
    summary = RunSummary(
        steps=trainer.state.global_step,
        final_loss=losses[-1] if losses else None,
        losses=losses,
        rewards=[float(log["reward"]) for log in steps if "reward" in log],
        final_kl=kls[-1] if kls else None,
        params_changed=parameter_change(trainer),
    )
    if logps is not None and logps.by_step:
        # Forwards recorded at global_step k belong to optimizer step k + 1 (counting from 1).
        first, last = min(logps.by_step), max(logps.by_step)
        summary.logp_first = (first + 1, *logps.step_stats(first))
        summary.logp_last = (last + 1, *logps.step_stats(last))
    if summary.steps == 0 or not losses:
        summary.failures.append("no optimizer step was taken")
    if not all(math.isfinite(x) for x in losses):
        summary.failures.append(f"non-finite loss {losses}")
    if summary.params_changed is not None and summary.params_changed[0] == 0:
        summary.failures.append("no parameter changed")
    if check_same_weights and summary.logp_first is not None and summary.logp_first[0] == 1:
        if not summary.logp_first[2] <= SAME_WEIGHTS_LOGP_TOL:
            summary.failures.append(
                f"before the first update the policy's log-probs differ from the reference model's by up to "
                f"{summary.logp_first[2]:.3g} (> {SAME_WEIGHTS_LOGP_TOL:g})"
            )
    return summary


def main(argv: Optional[list[str]] = None):
    """Train, print the summary (main process) and save it; returns the trainer (its ``apo_summary`` is the
    :class:`RunSummary`) or raises :class:`RunFailed` when a check failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model on CPU, nothing downloaded")
    parser.add_argument("--output-dir", default="runs/apo-qwen2.5-vl")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument(
        "--save-steps", type=int, default=None, help="checkpoint every this many steps (tiny 1, real 100)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    args = parser.parse_args(argv)

    print("loading TRL and transformers ...", file=sys.stderr, flush=True)
    from transformers.trainer_utils import get_last_checkpoint

    from apo_kernels.integrations.trl import APOTrainer

    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if args.tiny:
        print("building the tiny Qwen2.5-VL, its processor and data ...", file=sys.stderr, flush=True)
        processing_class = build_tiny_processor()
        model, dataset = save_tiny_model(processing_class, args.output_dir), tiny_dataset()
    else:
        model, processing_class, dataset = MODEL_ID, None, real_dataset()
    trainer = APOTrainer(
        model=model,
        reward_funcs=REWARD_FUNCS,
        args=apo_args(args.output_dir, args.tiny, args.max_steps, args.save_steps),
        train_dataset=dataset,
        processing_class=processing_class,
    )
    checkpoint = get_last_checkpoint(args.output_dir) if args.resume else None
    if args.resume and checkpoint is None:
        print(f"no checkpoint in {args.output_dir}: starting from step 0", file=sys.stderr, flush=True)
    logps = LogpComparison(trainer)
    trainer.train(resume_from_checkpoint=checkpoint)
    logps.handle.remove()

    final_dir = os.path.join(args.output_dir, "final")
    trainer.save_model(final_dir)
    summary = summarize(trainer, logps, check_same_weights=trainer.model.dtype.itemsize >= 4)
    trainer.apo_summary = summary
    if trainer.is_world_process_zero():
        summary_path = os.path.join(args.output_dir, "summary.json")
        last = get_last_checkpoint(args.output_dir)
        summary.saved = [f"{final_dir} (trained model)", f"{last} (last checkpoint, for --resume)", summary_path]
        with open(summary_path, "w") as f:
            json.dump(
                dict(asdict(summary), mean_reward=summary.mean_reward, log_history=trainer.state.log_history),
                f,
                indent=2,
            )
        print("\n".join(summary.lines("APO tiny run" if args.tiny else "APO run")), flush=True)
    if summary.failures:
        raise RunFailed("; ".join(summary.failures))
    return trainer


def cli(argv: Optional[list[str]] = None) -> int:
    """The command line: exit status 0 when the run passed its checks, 1 when it failed one or raised."""
    try:
        main(argv)
    except RunFailed as failure:
        print(f"run failed its checks: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
