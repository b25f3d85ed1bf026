"""How the kernels are launched: straight from Python in eager mode, through their custom ops otherwise.

The custom op is what ``torch.compile`` sees (one opaque call; it cannot trace the interpreter's launcher)
and what meta and fake tensors reach (its fake implementation, or the launcher the CPU dry run registers).
In eager mode on real tensors the op's dispatch would only add ~20 us a launch, longer than a row kernel
on a small chunk, so the launcher is called directly.
"""

from __future__ import annotations

import contextlib

import torch

from .. import inputs


def eager_or_op(op, launch, probe: torch.Tensor):
    """``launch`` when ``probe``'s values are real and not traced, else the custom op ``op`` around it."""
    return launch if inputs.values_checked(probe) else op


def on_device_of(x: torch.Tensor):
    """Triton launches on the current CUDA device's stream: make it ``x``'s (the head may sit on another GPU
    than the current one in a single-process multi-GPU model)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
