"""Input validation shared by the public functions.

Every check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape or value) naming the
argument and what was expected, so bad input never reaches a kernel. Value checks (finiteness, id ranges)
need one host sync each; under ``torch.compile`` they are skipped, since a compiled graph cannot raise on
data without breaking.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def values_checked(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether the host may read values: not while ``torch.compile`` traces, and not for ``meta`` or fake
    tensors (the CPU dry run of the CUDA path, ``benchmarks/dry_run.py``), which hold no data. Where it is
    False, value checks are skipped and shapes may not depend on data (every row is swept)."""
    if torch.compiler.is_compiling():
        return False
    return not any(t is not None and (t.is_meta or isinstance(t, FakeTensor)) for t in tensors)


def tensor(name: str, x, *, dtypes: Sequence[torch.dtype], kind: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor with {kind} dtype, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must have {kind} dtype (one of {', '.join(map(str, dtypes))}), got {x.dtype}")
    return x


def float_tensor(name: str, x) -> torch.Tensor:
    return tensor(name, x, dtypes=FLOAT_DTYPES, kind="a floating-point")


def shape(name: str, x: torch.Tensor, expected: Sequence[int], described: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {described} = {tuple(expected)}, got {tuple(x.shape)}")


def same_device(name: str, x: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but {like_name} is on {like.device}; move them to one device")


#: Elements per pass of a value check: bounds its temporaries (``isfinite`` makes an ``abs`` copy and a few
#: bool masks) to ~20 MiB, so checking a 151936 x 2048 LM head costs one read of it, not 1.5 GB.
CHECK_CHUNK = 1 << 22


def _all_rows(pred, x: torch.Tensor, where: Optional[torch.Tensor]) -> bool:
    """``pred(x, where).all()`` evaluated over slabs of leading rows, with a single host sync."""
    if x.dim() == 0:
        x, where = x.reshape(1), None if where is None else where.reshape(1)
    rows = max(1, CHECK_CHUNK // max(1, x[0].numel()))
    flags = [
        pred(x[i : i + rows], None if where is None else where[i : i + rows]).all()
        for i in range(0, x.shape[0], rows)
    ]
    return bool(torch.stack(flags).all())


def finite(name: str, x: torch.Tensor, where: Optional[torch.Tensor] = None) -> None:
    """``x`` (restricted to ``where`` when given) holds no NaN or infinity."""
    if not values_checked(x) or x.numel() == 0:
        return
    ok = _all_rows(lambda c, w: torch.isfinite(c) if w is None else torch.isfinite(c) | ~w, x, where)
    if not ok:
        scope = " at unmasked positions" if where is not None else ""
        raise ValueError(f"{name} contains NaN or infinite values{scope}")


def in_range(name: str, x: torch.Tensor, low: float, high: float, where: Optional[torch.Tensor] = None,
             described: str = "") -> None:
    """``low <= x < high`` (restricted to ``where`` when given)."""
    if not values_checked(x) or x.numel() == 0:
        return
    values = x if where is None else x[where]
    if values.numel() and not bool(((values >= low) & (values < high)).all()):
        bad = values[(values < low) | (values >= high)][0].item()
        scope = " at unmasked positions" if where is not None else ""
        raise ValueError(f"{name} must lie in [{low}, {high}){scope}{described}; found {bad}")
