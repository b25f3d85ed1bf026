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
# Local runs draw fresh examples each time (to find new failures); CI (CI=true) draws a fixed sequence so
# that a green main stays green and any failure reproduces.
settings.register_profile("apo", deadline=None, max_examples=25, print_blob=True)
settings.register_profile("ci", parent=settings.get_profile("apo"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "apo")
