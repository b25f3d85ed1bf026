"""Input validation shared by the public functions.

Every check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape or value) naming the
argument and what was expected, so bad input never reaches a kernel. Type, shape and device checks raise at
once. Value checks (finiteness, id ranges, 0/1 masks, positive counts) read tensor data, which on a GPU
waits for the device: a call gathers them in one :class:`ValueChecks` as device booleans and reads them all
with one host sync, so they all come after the type, shape and device checks. Under ``torch.compile`` and
for ``meta`` or fake tensors they are skipped (:func:`values_checked`), since a compiled graph cannot raise
on data without breaking.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

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


def _all_rows(pred, x: torch.Tensor, where: Optional[torch.Tensor]) -> torch.Tensor:
    """``pred(x, where).all()`` evaluated over slabs of leading rows, as a 0-dim bool tensor on ``x``'s device."""
    if x.dim() == 0:
        x, where = x.reshape(1), None if where is None else where.reshape(1)
    rows = max(1, CHECK_CHUNK // max(1, x[0].numel()))
    flags = [
        pred(x[i : i + rows], None if where is None else where[i : i + rows]).all()
        for i in range(0, x.shape[0], rows)
    ]
    return torch.stack(flags).all()


def _scope(where: Optional[torch.Tensor]) -> str:
    return " at unmasked positions" if where is not None else ""


class ValueChecks:
    """The value checks of one call: each adds a device boolean (no sync); :meth:`verify` reads them all with
    one host sync (per device) and raises the first failing check's ``ValueError``, reading the offending
    value for its message only then."""

    def __init__(self):
        self._pending: list[tuple[torch.Tensor, Callable[[], str]]] = []  # (ok, message if not ok)

    def finite(self, name: str, x: torch.Tensor, where: Optional[torch.Tensor] = None) -> None:
        """``x`` (restricted to ``where`` when given) holds no NaN or infinity."""
        if not values_checked(x) or x.numel() == 0:
            return
        ok = _all_rows(lambda c, w: torch.isfinite(c) if w is None else torch.isfinite(c) | ~w, x, where)
        self._pending.append((ok, lambda: f"{name} contains NaN or infinite values{_scope(where)}"))

    def in_range(self, name: str, x: torch.Tensor, low: float, high: float, where: Optional[torch.Tensor] = None,
                 described: str = "") -> None:
        """``low <= x < high`` (restricted to ``where`` when given)."""
        if not values_checked(x) or x.numel() == 0:
            return

        def inside(c, w):
            within = (c >= low) & (c < high)
            return within if w is None else within | ~w

        def message() -> str:
            outside = (x < low) | (x >= high)
            bad = x[outside if where is None else outside & where][0].item()
            return f"{name} must lie in [{low}, {high}){_scope(where)}{described}; found {bad}"

        self._pending.append((_all_rows(inside, x, where), message))

    def zero_or_one(self, name: str, x: torch.Tensor) -> None:
        """A bool, or a number tensor holding only 0 and 1."""
        if x.dtype == torch.bool or not values_checked(x) or x.numel() == 0:
            return
        self._pending.append((((x == 0) | (x == 1)).all(), lambda: f"{name} must hold only 0/1 (or False/True) values"))

    def positive(self, name: str, x: torch.Tensor) -> None:
        """Every element of ``x`` (a count: one element) is > 0."""
        if not values_checked(x) or x.numel() == 0:
            return
        self._pending.append(((x > 0).all(), lambda: f"{name} must be > 0, got {x.item()}"))

    def verify(self) -> None:
        """Read every pending check (one host sync per device they live on), then raise the first failure."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for ok, _ in self._pending:
            by_device.setdefault(ok.device, []).append(ok)
        if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
            return
        for ok, message in self._pending:
            if not bool(ok):
                raise ValueError(message())


def finite(name: str, x: torch.Tensor, where: Optional[torch.Tensor] = None) -> None:
    """:meth:`ValueChecks.finite` read at once (one sync)."""
    pending = ValueChecks()
    pending.finite(name, x, where)
    pending.verify()


def in_range(name: str, x: torch.Tensor, low: float, high: float, where: Optional[torch.Tensor] = None,
             described: str = "") -> None:
    """:meth:`ValueChecks.in_range` read at once (one sync)."""
    pending = ValueChecks()
    pending.in_range(name, x, low, high, where, described)
    pending.verify()
