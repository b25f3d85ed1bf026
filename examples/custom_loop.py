"""APO in a hand-written training loop: group stage once per rollout batch, fused loss per micro-batch.

Runs on CPU in seconds with a tiny random Qwen2 model (no download)::

    python examples/custom_loop.py

With a real model, replace ``tiny_model()`` by ``AutoModelForCausalLM.from_pretrained(...)``, the random
"rollout" by your sampler's output, and the random rewards by your reward functions.
"""

from __future__ import annotations

import copy

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from apo_kernels import APOConfig, apo_loss, fused_linear_logprobs, group_advantages

PROMPTS, GROUP, PROMPT_LEN, RESPONSE_LEN = 2, 4, 5, 7


def tiny_model() -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=1031,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,  # tied LM head, as on Qwen2.5-VL-3B
    )
    return Qwen2ForCausalLM(config)


def response_hidden(model, sequences: torch.Tensor) -> torch.Tensor:
    """Last hidden states at the positions that predict the response tokens (never the logits)."""
    hidden = model.model(input_ids=sequences).last_hidden_state
    return hidden[:, PROMPT_LEN - 1 : -1]


def main(steps: int = 3, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    policy = tiny_model()
    reference_model = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    config = APOConfig()  # the released View-R1 recipe: DADS + STCR, k3 KL with beta 1e-3
    losses = []
    for step in range(steps):
        # --- rollout (stand-in): G responses per prompt, padded, with a 0/1 accuracy + 0.5 format reward
        batch = PROMPTS * GROUP
        sequences = torch.randint(0, 1031, (batch, PROMPT_LEN + RESPONSE_LEN))
        lengths = torch.randint(2, RESPONSE_LEN + 1, (batch,))
        mask = torch.arange(RESPONSE_LEN)[None, :] < lengths[:, None]
        rewards = torch.randint(0, 2, (batch,)).float() + 0.5 * torch.randint(0, 2, (batch,)).float()
        targets = sequences[:, PROMPT_LEN:]

        # --- group stage, once per rollout batch
        groups = group_advantages(rewards, group_size=GROUP, lengths=lengths, config=config)
        with torch.no_grad():
            ref_logps, _ = fused_linear_logprobs(
                response_hidden(reference_model, sequences), reference_model.lm_head.weight, targets
            )

        # --- loss step (one micro-batch here): hidden states + tied LM head weight, no N x V logits
        out = apo_loss(
            response_hidden(policy, sequences),
            policy.lm_head.weight,
            targets,
            mask,
            groups.advantages,
            kl_weights=groups.kl_weights,
            ref_logps=ref_logps,
            config=config,
        )
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        metrics = ", ".join(f"{k}={v.item():.4f}" for k, v in out.metrics.items())
        print(f"step {step}: loss={out.loss.item():.5f}  {metrics}")
    return losses


if __name__ == "__main__":
    main()
