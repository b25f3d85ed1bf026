"""Following ``hidden`` through the library, call by call, file by file.

A profiler hook records each call into ``apo_kernels`` whose arguments hold ``hidden`` or a tensor made from it
(a view of its storage, or hidden states an earlier such call returned, e.g. the selected rows; dataclass fields
and tuples are looked into).
The files of those calls, consecutive repeats merged, and then the entry's file (where the results come back) are
the *stays*; a stay in a file already left is a *return*.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

import apo_kernels

PACKAGE = os.path.dirname(apo_kernels.__file__)


def _tensors(value, depth=0):
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 2 and isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item, depth + 1)
    elif depth < 2 and dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from _tensors(getattr(value, field.name, None), depth + 1)


def _storage(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def trace(entry, hidden: torch.Tensor, *args, **kwargs) -> list[str]:
    """The files (relative to the package) ``hidden`` stays in during ``entry(hidden, *args, **kwargs)``."""
    tracked = {_storage(hidden)}
    alive = [hidden]  # tracked storages stay allocated, so no other tensor reuses their address during the call
    calls: list[str] = []
    open_frames = set()

    def holds_tracked(values) -> bool:
        return any(_storage(t) in tracked for v in values for t in _tensors(v))

    def hook(frame, event, arg):
        path = frame.f_code.co_filename
        if not path.startswith(PACKAGE):
            return
        if event == "call":
            if holds_tracked(frame.f_locals.values()):
                calls.append(os.path.relpath(path, PACKAGE))
                open_frames.add(frame)
        elif event == "return" and frame in open_frames:
            open_frames.discard(frame)
            states = [t for t in _tensors(arg) if t.dim() >= 2 and t.shape[-1] == hidden.shape[-1]]
            alive.extend(states)
            tracked.update(map(_storage, states))

    sys.setprofile(hook)
    try:
        entry(hidden, *args, **kwargs)
    finally:
        sys.setprofile(None)
    calls.append(os.path.relpath(entry.__code__.co_filename, PACKAGE))
    stays = [path for i, path in enumerate(calls) if i == 0 or path != calls[i - 1]]
    return stays


def count(stays: list[str]) -> tuple[int, int]:
    """``(stays, returns)``."""
    return len(stays), sum(path in stays[:i] for i, path in enumerate(stays))
