"""The load both row kernels start from: one block of a row's logits, divided by tau, plus the bias."""

import triton
import triton.language as tl


@triton.jit
def scaled_logits(
    row_logits, bias_ptr, stride_b, c0, n_cols, inv_temp, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr
):
    """``(cols, ok, z)``: the block's columns, which lie in the slab, and ``z = logits / tau + b`` (the bias
    after the temperature division); lanes past the slab hold an arbitrary finite value, callers mask them."""
    cols = c0 + tl.arange(0, BLOCK)
    ok = cols < n_cols
    z = tl.load(row_logits + cols, mask=ok, other=0.0).to(ACC) * inv_temp
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols * stride_b, mask=ok, other=0.0).to(ACC)
    return cols, ok, z
