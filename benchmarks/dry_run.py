"""Dry run of the CUDA path at the real shapes on a machine without a GPU: memory beyond the inputs and their
gradients, host syncs and Triton launches of one call (forward and backward) of ``apo_loss`` and
``fused_linear_logprobs``.

    python benchmarks/dry_run.py                                  # every case below: table on stdout
    python benchmarks/dry_run.py --json benchmarks/results/dry-run-$(date +%Y%m%d).json
    python benchmarks/dry_run.py --tokens 32768 --dtypes bf16 --gpus 80GB --modes eager

Cases: ``apo_loss`` in one pass and in two (``sweep=``) and ``fused_linear_logprobs`` (two passes; the loss is
the sum of its log-probs and entropies) on the Qwen2.5-VL-3B head (D = 2048, V = 151936) in bf16, fp16 and
fp32, a micro-batch of 8 responses of N / 8 tokens, every token valid, N in 4096, 32768, 262144; eager and
``torch.compile(fullgraph=True, backend="aot_eager", dynamic=False)``; the default workspace of an 80 GB GPU
(79.19 GiB: 4.95 GiB) and of an H200 (143771 MiB: the 8 GiB cap). The loss is the benchmarks' (GRPO with a
k3 KL, ``benchmarks/impls.py``).

How: the inputs are ``meta`` tensors, which under ``devices.meta_as_cuda(total_memory)`` take every CUDA
branch (cuBLAS ``out_dtype`` matmuls, the Triton backend, CUDA's default workspace and chunk rule). The
library's custom ops run their real launchers as meta kernels and ``JITFunction.run`` records each launch
instead of compiling it (``launch_recording.py``). The measured call is a process's second with its inputs
(the first compiles, and fills the library's caches). Values are read as on a GPU with valid inputs:
``inputs.values_checked`` is True outside ``torch.compile`` (so validation runs and eager launches skip the
custom ops' dispatch as they do on real tensors), reads of device values answer 1 (every check passes) and
``nonzero`` or a boolean index selects every element. A ``TorchDispatchMode`` sees every aten op, so:

- memory: each new meta storage counts from the op that creates it until a ``weakref`` finalizer on it says
  it was freed; the peak of that running sum, leaving out the storages that end up as the inputs' gradients
  (the inputs exist before the call), is ``extra``. It is compared with the budget (``workspace_bytes``), with
  the driver's bound (``SweepPlan.extra_bytes`` of the plan the sweep ran: ``plan.plan_sweep`` is wrapped
  to record it) and with the materialized reference's ``N x V x 4`` bytes of logits plus their gradient;
- host syncs: reads of device values (``aten._local_scalar_dense``: ``item``, ``bool``; ``nonzero``,
  boolean indexing, ``masked_select``) and copies between the host and the device (CPU to meta
  ``_to_copy``/``copy_``, and ``torch.tensor(..., device=...)``, wrapped since it bypasses the dispatcher),
  each attributed from the Python stack: *sweep* inside the driver's ``autograd.Function`` forward or
  backward, *validation* in ``apo_kernels/inputs.py``, the input checks or the row selection
  (``RowSelection``), *other* elsewhere. Compiled code runs without those frames: its syncs count in *other*;
- Triton launches per call and per kernel, and how many went through a custom op's dispatch.

Compiled runs: ``torch.compile`` traces with fake tensors (the monitor is off then), ``aot_eager`` runs the
graph on the meta tensors (the monitor on, higher-order ops such as ``auto_functionalized`` through their
dense implementation). That graph is functionalized and not re-inplaced (inductor would re-inplace some of
it, but it cannot run on meta tensors): writes into the sweep's buffers become copies (``clone``,
``slice_scatter``, out-of-place ``addmm``), so the compiled memory is aot_eager's, not inductor's. On torch
2.11, ``addmm`` with ``out_dtype`` fails on meta and fake tensors (torch registers its ``addmm``
decomposition for that overload too, which takes ``out_dtype`` for ``beta``): the eager runs get a
shape-only meta kernel (``launch_recording.fix_meta_out_dtype_matmul``; a CUDA tensor never reaches it), but
fake tensors use the decomposition, so a compiled 16-bit case fails there as it would on a GPU and is
reported as an error with torch's message.

What a meta run cannot show: times and numerics (nothing runs); the caching allocator's rounding,
fragmentation and cuBLAS workspaces (memory here is tensor bytes); the aten ops a launcher makes when it is
called through a custom op (the monitor is off inside an op; its ``torch.tensor`` calls are counted);
data-dependent paths of invalid or masked inputs (every value reads as valid, every token is valid).

Output: a table on stdout (and the README memory-table figures), and with ``--json`` one record per case with
the environment (versions, commit, date). Exit status 1 when a case fails to run; missed targets are listed
(``tests/benchmarks/test_dry_run.py`` asserts them).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import traceback
import weakref
from collections import Counter
from pathlib import Path

import launch_recording  # first: it removes TRITON_INTERPRET before triton is imported

import torch
from torch._C import DispatchKey
from torch._ops import HigherOrderOperator
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import harness
import impls
from apo_kernels import apo_loss, devices, fused_linear_logprobs, inputs, plan

HIDDEN, VOCAB = 2048, 151936
TOKENS = (4096, 32768, 262144)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GPUS = {"80GB": int(79.19 * 2**30), "H200": 143771 * 2**20}  # total_memory of an 80 GB GPU and of an H200
ENTRIES = {"apo_loss": ("one-pass", "two-pass"), "fused_linear_logprobs": ("two-pass",)}
MODES = ("eager", "compile")
# The targets (issue 22): extra memory within the budget and the driver's bound; at most 1/40 of the
# materialized reference's and 100 launches per call at N = 32768; no sync in the sweep, at most 2 outside it.
REFERENCE_SHARE, LAUNCHES_PER_CALL, TARGET_TOKENS = 1 / 40, 100, 32768
SWEEP_SYNCS, OUTSIDE_SYNCS = 0, 2

ATEN = torch.ops.aten
VALIDATION_FUNCTIONS = {"RowSelection.__init__"}
PEAK_SOURCES = 4
_monitor = None  # the DeviceMonitor of the call being measured


def _caller_phase() -> tuple[str, str]:
    """Where in the call the current Python stack is, ``sweep``, ``validation`` or ``other``, and the library's
    innermost line on it (``path:line``; ``-`` when none: compiled code)."""
    phase, where = "other", "-"
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        path = code.co_filename.replace(os.sep, "/")
        if where == "-" and "/apo_kernels/" in path:
            where = f"{path[path.rindex('/apo_kernels/') + 1 :]}:{frame.f_lineno}"
        if path.endswith("apo_kernels/driver.py") and code.co_name in ("forward", "backward"):
            return "sweep", where
        if path.endswith("apo_kernels/inputs.py") or getattr(code, "co_qualname", code.co_name) in VALIDATION_FUNCTIONS:
            phase = "validation"
        frame = frame.f_back
    return phase, where


def _host_sync(func, args, kwargs):
    """What kind of host sync the op is on a GPU (None: none)."""
    if func is ATEN._local_scalar_dense.default:
        return "read of a device value"
    if func.overloadpacket in (ATEN.nonzero, ATEN.masked_select):
        return func.overloadpacket.__name__
    if func.overloadpacket in (ATEN.index, ATEN.index_put, ATEN.index_put_) and _has_bool_index(args[1]):
        return "boolean indexing"
    if func is ATEN._to_copy.default:
        return _copy_kind(args[0].device.type, torch.device(kwargs.get("device") or args[0].device).type)
    if func is ATEN.copy_.default:
        return _copy_kind(args[1].device.type, args[0].device.type)
    return None


def _copy_kind(source: str, target: str):
    if source == "cpu" and target != "cpu":
        return "host-to-device copy"
    if source != "cpu" and target == "cpu":
        return "device-to-host copy"
    return None


def _has_bool_index(indices) -> bool:
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)


def _every_element(indices) -> list:
    """Boolean indices as the integer indices of every element (a mask that is True everywhere)."""
    full = []
    for i in indices:
        if i is None or i.dtype not in (torch.bool, torch.uint8):
            full.append(i)
        else:
            full += [torch.empty(i.numel(), dtype=torch.long, device=i.device)] * i.dim()
    return full


def _answer(func, args, kwargs):
    """The result a GPU would give for valid inputs, for ops that read values meta tensors do not hold."""
    if func is ATEN._local_scalar_dense.default:
        return True if args[0].dtype == torch.bool else 1 if not args[0].is_floating_point() else 1.0
    if func.overloadpacket is ATEN.nonzero:
        return torch.empty((args[0].numel(), args[0].dim()), dtype=torch.long, device=args[0].device)
    if func.overloadpacket is ATEN.masked_select:
        numel = torch.broadcast_shapes(args[0].shape, args[1].shape).numel()
        return torch.empty(numel, dtype=args[0].dtype, device=args[0].device)
    if func.overloadpacket in (ATEN.index, ATEN.index_put, ATEN.index_put_) and _has_bool_index(args[1]):
        return func(args[0], _every_element(args[1]), *args[2:], **kwargs)
    if func is ATEN._to_copy.default and args[0].is_meta and torch.device(kwargs.get("device") or "meta").type == "cpu":
        return torch.ones(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
    if func is ATEN.copy_.default and args[1].is_meta and not args[0].is_meta:
        return args[0].fill_(1)
    return NotImplemented


class DeviceMonitor(TorchDispatchMode):
    """Every aten op of the call: the storages it creates (a timeline of allocations and releases) and the
    host syncs it would cost on a GPU, with the phase each happened in; ops that read values of meta tensors
    get :func:`_answer`'s result. Off while ``torch.compile`` traces (``ignore_compile_internals``), on while
    the compiled code runs."""

    def __init__(self):
        super().__init__()
        self.timeline: list[tuple[int, int]] = []  # (allocation id, +bytes at allocation / -bytes at release)
        self.live: dict[int, tuple[int, int]] = {}  # storage address -> (allocation id, bytes)
        self.sources: dict[int, str] = {}  # allocation id -> the op that made it
        self.syncs: list[tuple[str, str, str]] = []  # (phase, where, kind)
        self.ops = 0
        self.end = None  # len(timeline) when the measured call ended

    supports_higher_order_operators = True  # compiled graphs call auto_functionalized around mutating ops

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, HigherOrderOperator):  # its dense implementation, watched op by op
            dense = func.py_kernels.get(DispatchKey.CompositeExplicitAutograd)
            if dense is None:
                return NotImplemented
            with self:
                return dense(*args, **kwargs)
        self.ops += 1
        kind = _host_sync(func, args, kwargs)
        if kind:
            self.syncs.append((*_caller_phase(), kind))
        out = _answer(func, args, kwargs) if kind else NotImplemented
        if out is NotImplemented:
            out = func(*args, **kwargs)
        aliased = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_meta:
                self.allocated(t, func.__name__, aliased)
        return out

    def allocated(self, t: torch.Tensor, source: str, aliased: frozenset = frozenset()) -> None:
        """Count ``t``'s storage from now on, unless it is one of ``aliased`` (a view or an in-place result) or
        counted already; a counted storage that grew (``resize_``) counts the growth."""
        storage = t.untyped_storage()
        address, nbytes = storage._cdata, storage.nbytes()
        if address in self.live:
            allocation, counted = self.live[address]
            if nbytes > counted:
                self.live[address] = allocation, nbytes
                self.timeline.append((allocation, nbytes - counted))
            return
        if address in aliased:
            return
        allocation = len(self.timeline)
        self.live[address] = allocation, nbytes
        self.sources[allocation] = source
        self.timeline.append((allocation, nbytes))
        weakref.finalize(storage, self._released, address)

    def _released(self, address: int) -> None:
        allocation, nbytes = self.live.pop(address)
        self.timeline.append((allocation, -nbytes))

    def allocation_of(self, t: torch.Tensor):
        """The allocation id of ``t``'s storage (None when it was not created during the call)."""
        found = self.live.get(t.untyped_storage()._cdata)
        return None if found is None else found[0]

    def peak(self, leave_out: set) -> tuple[int, dict]:
        """The largest sum of live storages during the call, without the allocations ``leave_out``, and what
        was live then: bytes per op that made them, for the ops with the most (at most ``PEAK_SOURCES``)."""
        total = peak = 0
        live: dict[int, int] = {}
        at_peak: dict[int, int] = {}
        for allocation, delta in self.timeline[: self.end]:
            if allocation in leave_out:
                continue
            total += delta
            live[allocation] = live.get(allocation, 0) + delta
            if total > peak:
                peak, at_peak = total, {a: n for a, n in live.items() if n}
        by_source = Counter()
        for allocation, nbytes in at_peak.items():
            by_source[self.sources[allocation]] += nbytes
        return peak, dict(by_source.most_common(PEAK_SOURCES))


_torch_tensor = torch.tensor


def _tensor_counted(*args, **kwargs):
    """``torch.tensor``, which copies host data to the device without passing the dispatcher: a sync."""
    t = _torch_tensor(*args, **kwargs)
    if torch.compiler.is_compiling() or _monitor is None or t.device.type == "cpu":
        return t
    _monitor.syncs.append((*_caller_phase(), "torch.tensor on the device"))
    _monitor.allocated(t, "torch.tensor")
    return t


@contextlib.contextmanager
def measuring(monitor: DeviceMonitor):
    """``monitor`` watches the ops (and ``torch.tensor`` calls) of this block."""
    global _monitor
    _monitor = monitor
    try:
        with monitor:
            yield
    finally:
        _monitor = None
        monitor.end = len(monitor.timeline)


@contextlib.contextmanager
def as_on_a_gpu(total_memory: int, plans: list):
    """Meta tensors stand for CUDA tensors of a GPU with ``total_memory`` bytes and for valid values (see the
    module docstring); ``plans`` receives each ``plan.plan_sweep`` result."""
    plan_sweep, values_checked = plan.plan_sweep, inputs.values_checked

    def recorded_plan(*args, **kwargs):
        planned = plan_sweep(*args, **kwargs)
        plans.append(planned)
        return planned

    plan.plan_sweep, inputs.values_checked = recorded_plan, lambda *tensors: not torch.compiler.is_compiling()
    torch.tensor = _tensor_counted
    try:
        with devices.meta_as_cuda(total_memory):
            yield
    finally:
        plan.plan_sweep, inputs.values_checked, torch.tensor = plan_sweep, values_checked, _torch_tensor


def make_step(entry: str, sweep: str, tokens: int, dtype: torch.dtype):
    """``(hidden, weight, loss_fn)``: leaf meta inputs and the call whose loss is differentiated."""
    shape = (harness.GROUP_SIZE, tokens // harness.GROUP_SIZE)
    meta = dict(device="meta", dtype=dtype, requires_grad=True)
    hidden, weight = torch.empty(*shape, HIDDEN, **meta), torch.empty(VOCAB, HIDDEN, **meta)
    targets = torch.empty(shape, dtype=torch.int64, device="meta")
    if entry == "fused_linear_logprobs":

        def loss_fn(hidden, weight):
            logps, entropy = fused_linear_logprobs(hidden, weight, targets, return_entropy=True)
            return logps.sum() + entropy.sum()
    else:
        per_token = dict(dtype=torch.float32, device="meta")
        mask, advantages = torch.empty(shape, dtype=torch.bool, device="meta"), torch.empty(shape[0], **per_token)
        old, ref = torch.empty(shape, **per_token), torch.empty(shape, **per_token)

        def loss_fn(hidden, weight):
            return apo_loss(
                hidden,
                weight,
                targets,
                mask,
                advantages,
                old_logps=old,
                ref_logps=ref,
                config=impls.APO_CONFIG,
                sweep=sweep,
            ).loss

    return hidden, weight, loss_fn


def run_case(entry: str, sweep: str, mode: str, dtype_name: str, tokens: int, gpu: str) -> dict:
    record = dict(
        entry=entry,
        sweep=sweep,
        mode=mode,
        dtype=dtype_name,
        tokens=tokens,
        hidden=HIDDEN,
        vocab=VOCAB,
        gpu=gpu,
        total_memory=GPUS[gpu],
        reference_bytes=2 * tokens * VOCAB * 4,
    )
    torch._dynamo.reset()
    plans: list = []
    launches: Counter = Counter()
    through_ops = 0

    def count(fn, args, kwargs, programs):
        nonlocal through_ops
        launches[fn.__name__] += 1
        through_ops += launch_recording.in_custom_op()

    try:
        with as_on_a_gpu(GPUS[gpu], plans):
            record["workspace_bytes"] = plan.default_workspace_bytes(torch.device("meta"))
            hidden, weight, loss_fn = make_step(entry, sweep, tokens, DTYPES[dtype_name])
            if mode == "compile":
                loss_fn = torch.compile(loss_fn, fullgraph=True, backend="aot_eager", dynamic=False)
            # The measured call is the second: the first compiles, and fills the library's caches (once per process).
            with launch_recording.recording(lambda *launch: None), measuring(DeviceMonitor()):
                loss_fn(hidden, weight).backward()
            hidden.grad = weight.grad = None
            monitor = DeviceMonitor()
            with launch_recording.recording(count), measuring(monitor):
                loss_fn(hidden, weight).backward()
            gradients = {monitor.allocation_of(x.grad) for x in (hidden, weight)} - {None}
    except Exception as e:  # noqa: BLE001  (reported per case; the exit status says it failed)
        traceback.print_exc()
        return dict(record, status="error", error=_summary(e))
    planned = plans[-1]
    extra, at_peak = monitor.peak(gradients)
    phases = Counter(phase for phase, _, _ in monitor.syncs)
    return dict(
        record,
        status="ok",
        error=None,
        plan=dict(
            one_pass=planned.one_pass,
            rows=planned.tile.rows,
            cols=planned.tile.cols,
            chunks=-(-tokens // planned.tile.rows) if planned.one_pass else None,
        ),
        extra_bytes=extra,
        live_at_peak=at_peak,
        formula_bytes=getattr(planned, "extra_bytes", None),
        syncs={phase: phases[phase] for phase in ("sweep", "validation", "other")},
        sync_sites={
            f"{phase}: {kind} at {where}": n for (phase, where, kind), n in sorted(Counter(monitor.syncs).items())
        },
        launches=sum(launches.values()),
        launches_per_kernel=dict(sorted(launches.items())),
        launches_through_custom_ops=through_ops,
        aten_ops=monitor.ops,
    )


def _summary(e: Exception) -> str:
    """The exception in one line; of dynamo's, the part that names the failing call."""
    text = " ".join(str(e).split())
    context = text.find("Developer debug context:")
    return f"{type(e).__name__}: " + (text[context:] if context >= 0 else text)[:600]


def misses(r: dict) -> list[str]:
    """The targets a case misses (see the constants above)."""
    if r["status"] != "ok":
        return ["failed: " + r["error"]]
    found = []
    if r["extra_bytes"] > r["workspace_bytes"]:
        found.append("extra > workspace")
    if r["formula_bytes"] is None or r["extra_bytes"] > r["formula_bytes"]:
        found.append("extra > formula" if r["formula_bytes"] is not None else "no formula")
    at_target = r["tokens"] == TARGET_TOKENS
    if at_target and r["extra_bytes"] > REFERENCE_SHARE * r["reference_bytes"]:
        found.append("extra > 1/40 reference")
    if r["syncs"]["sweep"] > SWEEP_SYNCS:
        found.append("syncs in sweep")
    if r["syncs"]["validation"] + r["syncs"]["other"] > OUTSIDE_SYNCS:
        found.append(f"> {OUTSIDE_SYNCS} syncs outside sweep")
    if at_target and r["launches"] > LAUNCHES_PER_CALL:
        found.append(f"> {LAUNCHES_PER_CALL} launches")
    return found


def _gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def print_table(records: list[dict]) -> None:
    columns = (
        "entry",
        "sweep",
        "mode",
        "dtype",
        "N",
        "GPU",
        "plan",
        "extra GiB",
        "formula",
        "budget",
        "ref/extra",
        "syncs s/v/o",
        "launches",
        "via op",
        "misses",
    )
    rows = []
    for r in records:
        head = (r["entry"], r["sweep"], r["mode"], r["dtype"], str(r["tokens"]), r["gpu"])
        if r["status"] != "ok":
            rows.append(head + ("ERROR",) + ("",) * 7 + ("; ".join(misses(r))[:120],))
            continue
        plan = r["plan"]
        plan_text = f"{plan['chunks']} x {plan['rows']}" if plan["one_pass"] else f"{plan['rows']} x {plan['cols']}"
        syncs = r["syncs"]
        rows.append(
            head
            + (
                plan_text,
                _gib(r["extra_bytes"]),
                _gib(r["formula_bytes"]),
                _gib(r["workspace_bytes"]),
                f"{r['reference_bytes'] / max(r['extra_bytes'], 1):.0f}",
                f"{syncs['sweep']}/{syncs['validation']}/{syncs['other']}",
                str(r["launches"]),
                str(r["launches_through_custom_ops"]),
                ", ".join(misses(r)),
            )
        )
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    for cells in (columns, ["-" * w for w in widths], *rows):
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    print(
        "plan: one pass chunks x rows, two passes tile rows x cols; extra: peak of live tensors beyond the inputs "
        "and their gradients;\nformula: SweepPlan.extra_bytes; budget: workspace_bytes; ref/extra: the materialized "
        "reference's N x V x 4 bytes of logits plus gradient over extra;\nsyncs: in the sweep / validation / other; "
        "via op: launches through a custom op's dispatch"
    )


def print_readme_figures(records: list[dict]) -> None:
    """The README memory table's dry-run figures: extra memory of apo_loss, bf16, eager, per N and sweep."""
    cells = {
        (r["tokens"], r["gpu"], r["sweep"]): r["extra_bytes"]
        for r in records
        if r["status"] == "ok" and r["entry"] == "apo_loss" and r["dtype"] == "bf16" and r["mode"] == "eager"
    }
    if not cells:
        return
    keys = sorted({key[1:] for key in cells})
    print(
        "\nREADME memory table, dry run (apo_loss, bf16, eager, Qwen2.5-VL-3B head): extra bytes beyond the "
        "inputs and their gradients"
    )
    print("| tokens | " + " | ".join(f"{sweep} ({gpu})" for gpu, sweep in keys) + " |")
    print("|---:|" + "---:|" * len(keys))
    for tokens in sorted({key[0] for key in cells}):
        values = [cells.get((tokens, *key)) for key in keys]
        print(f"| {tokens} | " + " | ".join("" if v is None else f"{v / 2**30:.2f} GiB ({v})" for v in values) + " |")


def parse_case(text: str) -> tuple:
    """``ENTRY:SWEEP:MODE:DTYPE:N:GPU`` as :func:`run_case`'s arguments."""
    parts = text.split(":")
    if len(parts) != 6 or not parts[4].isdigit():
        raise argparse.ArgumentTypeError(f"expected ENTRY:SWEEP:MODE:DTYPE:N:GPU, got {text!r}")
    entry, sweep, mode, dtype, tokens, gpu = parts
    for name, value, allowed in (
        ("entry", entry, ENTRIES),
        ("mode", mode, MODES),
        ("dtype", dtype, DTYPES),
        ("gpu", gpu, GPUS),
    ):
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"{name} must be one of {list(allowed)}, got {value!r}")
    if sweep not in ENTRIES[entry]:
        raise argparse.ArgumentTypeError(f"{entry} takes sweep {ENTRIES[entry]}, got {sweep!r}")
    if int(tokens) <= 0 or int(tokens) % harness.GROUP_SIZE:
        raise argparse.ArgumentTypeError(f"N must be a positive multiple of {harness.GROUP_SIZE}, got {tokens}")
    return entry, sweep, mode, dtype, int(tokens), gpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--entries", nargs="+", choices=list(ENTRIES), default=list(ENTRIES))
    ap.add_argument(
        "--sweeps",
        nargs="+",
        choices=("one-pass", "two-pass"),
        default=["one-pass", "two-pass"],
        help="apo_loss's sweep= (fused_linear_logprobs always takes two passes)",
    )
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS), help="N, multiples of 8")
    ap.add_argument(
        "--gpus",
        nargs="+",
        choices=list(GPUS),
        default=list(GPUS),
        help="total memory: 80GB = 79.19 GiB (workspace 4.95 GiB), H200 = 143771 MiB (8 GiB cap)",
    )
    ap.add_argument(
        "--case",
        action="append",
        type=parse_case,
        metavar="ENTRY:SWEEP:MODE:DTYPE:N:GPU",
        help="run this case (repeatable) instead of the grid of the options above, e.g.\n"
        "apo_loss:one-pass:eager:bf16:32768:80GB",
    )
    ap.add_argument("--json", type=Path, help="write the environment and one record per case here")
    a = ap.parse_args()
    if any(n <= 0 or n % harness.GROUP_SIZE for n in a.tokens):
        ap.error(f"--tokens must be positive multiples of {harness.GROUP_SIZE}, got {a.tokens}")

    launch_recording.register_meta_launchers()
    fixed_matmul = launch_recording.fix_meta_out_dtype_matmul()
    cases = a.case or [
        (entry, sweep, mode, dtype, tokens, gpu)
        for entry, mode, dtype, tokens, gpu in itertools.product(a.entries, a.modes, a.dtypes, a.tokens, a.gpus)
        for sweep in ENTRIES[entry]
        if sweep in a.sweeps
    ]
    records = []
    for case in cases:
        records.append(run_case(*case))
        print(f"{len(records)}/{len(cases)} {' '.join(map(str, case))}: {records[-1]['status']}", file=sys.stderr)
    print_table(records)
    print_readme_figures(records)
    if a.json:
        env = dict(
            harness.environment("cpu"),
            device="meta (dry run of the CUDA path)",
            meta_out_dtype_matmul_fixed=fixed_matmul,
        )
        settings = dict(
            hidden=HIDDEN,
            vocab=VOCAB,
            group_size=harness.GROUP_SIZE,
            gpus=GPUS,
            loss="GRPO + k3 KL, token-mean (bnpo), benchmarks/impls.py",
            targets=dict(
                reference_share=REFERENCE_SHARE,
                launches_per_call=LAUNCHES_PER_CALL,
                target_tokens=TARGET_TOKENS,
                sweep_syncs=SWEEP_SYNCS,
                outside_syncs=OUTSIDE_SYNCS,
            ),
        )
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(
            json.dumps(
                dict(environment=env, settings=settings, records=[dict(r, misses=misses(r)) for r in records]), indent=1
            )
            + "\n"
        )
    return 1 if any(r["status"] != "ok" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
