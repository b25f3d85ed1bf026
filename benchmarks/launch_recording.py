"""Runs the GPU path's Triton launchers on ``meta`` tensors and records each launch instead of compiling it,
on a machine without a GPU; shared by ``kernel_report.py`` and ``dry_run.py``.

Import this module before anything imports ``triton``: it removes ``TRITON_INTERPRET`` from the environment
(under the interpreter the kernels are not ``JITFunction``s whose ``run`` can be recorded).

- :func:`register_meta_launchers`: the library's custom ops (``apo_kernels::*``) get their real launchers as
  ``Meta`` kernels, so a call on meta tensors that goes through an op (under ``torch.compile``, or when the
  library sees no values) launches, where the op's fake implementation would do nothing. Once per process.
- :func:`recording`: ``JITFunction.run`` hands each launch to a callback instead of compiling and running it.
- :func:`fix_meta_out_dtype_matmul`: a ``Meta`` kernel for ``addmm`` with ``out_dtype`` where torch's fails on
  meta tensors (torch 2.11), so that the CUDA branch of ``driver._mm_into`` runs on them.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Callable

os.environ.pop("TRITON_INTERPRET", None)  # before triton is first imported (apo_kernels imports it)

import torch  # noqa: E402
from torch._library.custom_ops import OPDEFS  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import apo_kernels.kernels  # noqa: E402, F401  (defines the custom ops)

NAMESPACE = "apo_kernels"
_meta_library = None  # holds the registrations: they last as long as this Library object
_op_depth = 0  # > 0 while a custom op's launcher runs as a Meta kernel


def register_meta_launchers() -> list[str]:
    """Make every ``apo_kernels::`` custom op run its launcher on meta tensors; returns the ops' names.

    Idempotent. The ops' fake implementations already hold the ``Meta`` key (``register_fake``), which
    ``CustomOpDef.register_kernel("meta", ...)`` refuses to override on torch 2.11, hence a ``Library``
    registration with ``allow_override``. Fake tensors (``torch.compile``'s tracing) still reach the fake
    implementations: ``FakeTensorMode`` calls them, not the ``Meta`` kernel.
    """
    global _meta_library
    ops = sorted(name for name in OPDEFS if name.startswith(NAMESPACE + "::"))
    if _meta_library is None:
        library = torch.library.Library(NAMESPACE, "IMPL")
        for name in ops:
            library.impl(name.split("::")[1], _as_meta_kernel(OPDEFS[name]._init_fn), "Meta", allow_override=True)
        _meta_library = library
    return ops


def _as_meta_kernel(launcher: Callable) -> Callable:
    def meta_kernel(*args, **kwargs):
        global _op_depth
        _op_depth += 1
        try:
            return launcher(*args, **kwargs)
        finally:
            _op_depth -= 1

    return meta_kernel


def in_custom_op() -> bool:
    """Whether the launch being recorded came through a custom op's dispatch (not a direct launcher call)."""
    return _op_depth > 0


def _addmm_out_dtype_works() -> bool:
    out = torch.empty(2, 2, device="meta")
    half = torch.empty(2, 2, device="meta", dtype=torch.bfloat16)
    try:
        torch.addmm(out, half, half, beta=0.0, alpha=0.5, out_dtype=torch.float32, out=out)
    except TypeError:
        return False
    return True


def _addmm_out_dtype_meta(self, mat1, mat2, out_dtype, *, beta=1, alpha=1, out):
    rows, inner = mat1.shape
    if mat2.shape[0] != inner or out.dtype != out_dtype:
        raise RuntimeError(
            f"addmm: mat1 {tuple(mat1.shape)}, mat2 {tuple(mat2.shape)}, out {out.dtype}, out_dtype {out_dtype}"
        )
    torch.broadcast_shapes(self.shape, (rows, mat2.shape[1]))
    return out.resize_(rows, mat2.shape[1])


_fixed_meta_library = None


def fix_meta_out_dtype_matmul() -> bool:
    """Give ``aten::addmm.dtype_out`` (``torch.addmm(..., out_dtype=, out=)``) a shape-only ``Meta`` kernel where
    torch's own fails on meta tensors; returns whether it was needed. Idempotent.

    torch 2.11 registers its ``addmm`` decomposition for every overload, ``dtype_out`` included, where it takes
    ``out_dtype`` for ``beta`` (``TypeError``). CUDA tensors do not go through it, so the dry run of an eager
    CUDA call may; fake tensors (``torch.compile``) use the decomposition table, not this kernel, so a compiled
    run still meets torch's failure as it would on a GPU.
    """
    global _fixed_meta_library
    if _fixed_meta_library is None and not _addmm_out_dtype_works():
        library = torch.library.Library("aten", "IMPL")
        library.impl("addmm.dtype_out", _addmm_out_dtype_meta, "Meta", allow_override=True)
        _fixed_meta_library = library
    return _fixed_meta_library is not None


@contextlib.contextmanager
def recording(on_launch: Callable[[JITFunction, tuple, dict, int], None]):
    """Within this block ``on_launch(kernel, args, kwargs, programs)`` receives each Triton launch instead of
    ``JITFunction.run`` (nothing is compiled or run); ``programs`` is the grid's size."""

    def record(fn, *args, grid, warmup, **kwargs):
        on_launch(fn, args, kwargs, math.prod(grid))

    saved, JITFunction.run = JITFunction.run, record
    try:
        yield
    finally:
        JITFunction.run = saved
