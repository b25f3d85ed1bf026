"""Test-session setup shared by every test module.

Without a GPU the Triton kernels run in the interpreter, which must be switched on before ``triton`` is
first imported (liger-kernel and torch._inductor import it too), so it happens here, first. With a GPU it
stays off (kernels compile for the GPU), so the tests marked ``interpreter`` (Triton on CPU tensors) are
skipped there and those marked ``cuda`` run; without one it is the other way round (markers: pyproject.toml).
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

# Interpreted kernels and float64 oracles are slow on 2 cores: no per-example deadline, modest defaults.
# Local runs draw fresh examples each time (to find new failures); CI (CI=true) draws a fixed sequence so
# that a green main stays green and any failure reproduces.
settings.register_profile("apo", deadline=None, max_examples=25, print_blob=True)
settings.register_profile("ci", parent=settings.get_profile("apo"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "apo")


# The interpreter is on where this file switched it on (no CUDA) or the caller did: the library's rule.
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
SKIP_INTERPRETER = pytest.mark.skip(
    reason="runs Triton kernels on CPU tensors, which needs the Triton interpreter: off here (tests/conftest.py "
    "turns it on only without CUDA; with CUDA the tests marked cuda run instead)"
)
SKIP_CUDA = pytest.mark.skip(reason="needs a CUDA GPU; its interpreter twin runs on CPU")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not INTERPRETER and item.get_closest_marker("interpreter"):
            item.add_marker(SKIP_INTERPRETER)
        if not CUDA and item.get_closest_marker("cuda"):
            item.add_marker(SKIP_CUDA)
