"""Train Qwen2.5-VL with APO through TRL: ``APOTrainer`` in place of ``GRPOTrainer``.

Real run (Qwen2.5-VL-3B-Instruct on an image-question dataset with verifiable answers)::

    pip install 'apo-kernels[trl]'
    accelerate launch examples/trl_apo_qwen2_5_vl.py --output-dir runs/apo-qwen2.5-vl-3b

  GPU: written for 8 x 80 GB (A100/H100) with bf16 and gradient checkpointing, one process per GPU; a single
  80 GB GPU also runs it with the default per-device batch (8 completions per prompt, 1024 new tokens), slowly.
  The policy, the reference model and generation share each GPU (no vLLM needed). The model and the dataset
  (``lmms-lab/multimodal-open-r1-8k-verified``) download from the Hugging Face Hub on first use.

Tiny run (CPU, no download, under 5 minutes): a small random Qwen2.5-VL built from a config, a tokenizer and
processor made locally, and a synthetic "what colour is the picture?" dataset, trained for a few steps::

    python examples/trl_apo_qwen2_5_vl.py --tiny --output-dir /tmp/apo-tiny

Rewards follow the paper: accuracy (1 when the answer is right) plus a format bonus (0.5 for
``<think>...</think><answer>...</answer>``); a response is *correct* for STCR/DADS when its total reward is >= 1.
"""

from __future__ import annotations

import argparse
import os
import re
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
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
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
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=_tiny_video_processor(),
        chat_template=_TINY_CHAT_TEMPLATE,
    )


def _tiny_video_processor():
    """Qwen2.5-VL's processor insists on a video processor, whose real class needs torchvision; without it,
    transformers only offers a placeholder class, which is enough here since the tiny data has no video."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers.models.qwen2_vl import Qwen2VLVideoProcessor

        return Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2)
    placeholder = Qwen2_5_VLProcessor.get_possibly_dynamic_module("BaseVideoProcessor")

    class NoVideoProcessor(placeholder):
        def __init__(self):  # the placeholder's __init__ only raises "requires torchvision"
            pass

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


def apo_args(output_dir: str, tiny: bool, max_steps: Optional[int]):
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
        save_strategy="no",
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


def main(argv: Optional[list[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model on CPU, nothing downloaded")
    parser.add_argument("--output-dir", default="runs/apo-qwen2.5-vl")
    parser.add_argument("--max-steps", type=int, default=None)
    args = parser.parse_args(argv)

    from apo_kernels.integrations.trl import APOTrainer

    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if args.tiny:
        processing_class = build_tiny_processor()
        model, dataset = save_tiny_model(processing_class, args.output_dir), tiny_dataset()
    else:
        model, processing_class, dataset = MODEL_ID, None, real_dataset()
    trainer = APOTrainer(
        model=model,
        reward_funcs=REWARD_FUNCS,
        args=apo_args(args.output_dir, args.tiny, args.max_steps),
        train_dataset=dataset,
        processing_class=processing_class,
    )
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
