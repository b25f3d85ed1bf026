"""Test-session setup shared by every test module.

Without a GPU the Triton kernels run in the interpreter, which must be switched on before ``triton`` is
first imported (liger-kernel and torch._inductor import it too), so it happens here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

# Interpreted kernels and float64 oracles are slow on 2 cores: no per-example deadline, modest defaults.
settings.register_profile("apo", deadline=None, max_examples=25, derandomize=False)
settings.load_profile("apo")
