"""The tiny random language model the integration tests share: CPU-fast, nothing downloaded."""

from transformers import Qwen2Config

#: A Qwen2-style decoder small enough for CPU runs (grouped-query attention kept: 4 heads, 2 KV heads).
TINY_TEXT_DIMS = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def tiny_qwen2_config(vocab_size: int, **fields) -> Qwen2Config:
    """``Qwen2Config`` of ``TINY_TEXT_DIMS`` with ``vocab_size`` and the caller's other ``fields``."""
    return Qwen2Config(vocab_size=vocab_size, **TINY_TEXT_DIMS, **fields)
