"""Completions that do not depend on sampling: the same training data in every run and every process layout.

Passed to ``APOTrainer``/``GRPOTrainer`` as ``rollout_func`` (TRL's hook for custom generation), so the
trainers' own loops run unchanged: sampler, reward functions, group stage, loss, optimizer.
"""

from collections import Counter

from examples import trl_apo_qwen2_5_vl as example


def prompt_text(prompt) -> str:
    """The text of a conversational prompt (the images' reprs hold memory addresses)."""
    parts = []
    for message in prompt:
        content = message["content"]
        parts += [content] if isinstance(content, str) else [c["text"] for c in content if c.get("type") == "text"]
    return " ".join(parts)


def deterministic_rollout(prompts, trainer):
    """The k-th copy of a prompt at a given training step gets completion k of that prompt and step: tokens
    and lengths vary within a group (so do rewards and advantages) and from step to step, and not with the
    process that generates them."""
    prompt_ids, _, _ = trainer._tokenize_prompts(prompts)
    words = [trainer.processing_class.tokenizer.convert_tokens_to_ids(w) for w in example.TINY_COLOURS]
    seen = Counter()
    completions = []
    for prompt in prompts:
        key = prompt_text(prompt)
        k, seen[key] = seen[key], seen[key] + 1
        salt = sum(map(ord, key)) + 7 * trainer.state.global_step
        completions.append([words[(salt + k * (j + 1)) % len(words)] for j in range(2 + (salt + k) % 5)])
    return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": [[0.0] * len(c) for c in completions]}
