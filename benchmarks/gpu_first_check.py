#!/usr/bin/env python
"""The first check on a GPU machine: does the CUDA path run, and how far is it from its targets? At most 2
minutes on one H200; ``gpu_suite.sh`` runs it first, and it runs alone as well.

    python benchmarks/gpu_first_check.py                   # on the GPU machine (results under $OUT)
    python benchmarks/gpu_first_check.py --device cpu --tokens 64 --hidden 32 --vocab 300   # checks the check
    python benchmarks/gpu_first_check.py --dry-run         # the steps and their estimates; runs nothing

Steps, each independent (one that fails is recorded and the next runs; the exit status is 1 if any failed):

1. ``versions``: Python, torch, CUDA, Triton, numpy, the GPU, the commit.
2. ``addmm_out_dtype``: ``torch.addmm(out32, a16, b16, beta=1.0, alpha=0.5, out_dtype=torch.float32,
   out=out32)``, the call every bf16 GEMM of the library makes, against ``out32 + 0.5 * (a16.float() @
   b16.float())`` (CUDA only: torch has no out_dtype matmuls on CPU).
3. ``gpu_tests``: ``pytest -m "not interpreter" tests/kernels/test_gpu.py`` in a subprocess (on CPU its CUDA
   tests skip; their interpreter twins run in the test suite).
4. ``apo_loss_step``: one ``apo_loss`` step (forward and backward, bf16, beta 0.04; default N = 32768,
   D = 2048, V = 151936) after a warm-up: its time; on CUDA also its peak memory beyond the inputs and their
   gradients against the budget (``plan.default_workspace_bytes``), the host syncs it makes under
   ``torch.cuda.set_sync_debug_mode("warn")`` (counted, with the source lines that make them) and a
   ``torch.profiler`` count of its kernels (Triton launches, host-to-device copies, how busy the GPU is).
5. ``compiled_call``: ``torch.compile(fullgraph=True)`` of that step at a small shape (inductor on CUDA,
   aot_eager on CPU), against eager.

Each step prints its estimated time on an H200 (from ``roofline.py`` where it has the numbers, else a stated
guess) and its measured time. The results go into one JSON, ``gpu_first_check-<gpu or cpu>-<date>.json``
(environment, settings, every step's status, times and figures), rewritten after each step, under
``--out-dir``: by default ``$OUT`` when it is set (on a GPU machine lent through the device tool only that
folder comes back), else ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

import harness  # first: puts this checkout's apo_kernels on sys.path
import impls
import report
import roofline
from apo_kernels import devices, plan

NAME = "gpu_first_check"
GPU = "H200"  # the machine the estimates are for
H200_MEMORY_BYTES = 143771 * 2**20  # what torch reports for it; its default workspace is the 8 GiB cap
ADDMM_SHAPE = (4096, 2048, 4096)  # (m, k, n): a logits slab of the Qwen head
# Products of bf16 numbers are exact in float32: the two sides differ only in the order of k float32 additions,
# about sqrt(k) 2^-24 ~ 3e-6 relative.
ADDMM_TOLERANCE = 1e-5
TESTS_TIMEOUT_S = 100
TIMED_STEPS = 3
COMPILE_TOKENS = 512
COMPILE_TOLERANCE = {"loss": 1e-4, "grads": 2e-2}  # float32 loss; bf16 gradients (one rounding apart at most)
SYNC_WARNING = "called a synchronizing CUDA operation"  # what set_sync_debug_mode("warn") warns
# Issue 22's targets for one apo_loss call at N = 32768 (reported, not failures: the step measures them).
MAX_HOST_SYNCS = 2  # in validation; none in the sweep
MAX_TRITON_LAUNCHES = 100


class Skipped(Exception):
    """The step cannot run on this device (the reason)."""


class CheckFailed(Exception):
    """The step ran and its result is wrong."""


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[["Context"], dict]  # the step's figures; raises Skipped or fails by raising
    estimate_s: float  # on the H200
    basis: str  # where the estimate comes from


@dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    environment: dict  # the versions step's, once it has run

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def roofline_step_seconds(tokens: int, hidden: int, vocab: int) -> tuple[float, str]:
    """The roofline's time of one bf16 apo_loss step on the H200 at its default workspace, and the sweep."""
    with devices.meta_as_cuda(H200_MEMORY_BYTES):
        workspace = plan.default_workspace_bytes(torch.device("meta"))
    planned = roofline.plan(tokens, hidden, vocab, workspace, "auto")
    phases = (roofline.one_pass_phases if planned.one_pass else roofline.two_pass_phases)(
        tokens, hidden, vocab, planned.tile
    )
    seconds = sum(roofline.predicted_seconds(flops, nbytes, kind, GPU) for _name, flops, nbytes, kind in phases)
    return seconds, "one-pass" if planned.one_pass else "two-pass"


def roofline_gemm_seconds(m: int, k: int, n: int) -> float:
    """The roofline's time of an (m, k) x (k, n) bf16 GEMM with float32 output on the H200."""
    return roofline.predicted_seconds(2 * m * k * n, 2 * (m * k + k * n) + 4 * m * n, "mm", GPU)


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


# --- the steps ------------------------------------------------------------------------------------------


def versions(ctx: Context) -> dict:
    env = harness.environment(ctx.device.type)  # on cuda, GPU 0's properties from a child process
    ctx.environment = env
    figures = {
        "python": env["python"],
        **env["versions"],
        "cuda": torch.version.cuda,
        "git_commit": env["git_commit"],
        "git_dirty": env["git_dirty"],
    }
    if ctx.cuda:
        figures.update(
            gpu=env["gpu"],
            gpu_memory_bytes=env["gpu_memory_bytes"],
            capability=".".join(map(str, torch.cuda.get_device_capability(ctx.device))),
        )
    for name, value in figures.items():
        print(f"    {name}: {value}")
    return figures


def addmm_out_dtype(ctx: Context) -> dict:
    if not ctx.cuda:
        raise Skipped("torch's out_dtype matmuls are CUDA-only (on CPU the library upcasts the operands)")
    m, k, n = ADDMM_SHAPE
    gen = torch.Generator(ctx.device).manual_seed(0)
    a16 = torch.randn(m, k, generator=gen, device=ctx.device).to(torch.bfloat16)
    b16 = torch.randn(k, n, generator=gen, device=ctx.device).to(torch.bfloat16)
    out32 = torch.randn(m, n, generator=gen, device=ctx.device)
    # Before out32 is overwritten; IEEE float32 (this process leaves the TF32 switches at their default, off).
    expected = out32 + 0.5 * (a16.float() @ b16.float())
    result = torch.addmm(out32, a16, b16, beta=1.0, alpha=0.5, out_dtype=torch.float32, out=out32)
    error = relative_error(result, expected)
    returns_out = result.data_ptr() == out32.data_ptr()
    ctx.synchronize()
    start = time.perf_counter()
    torch.addmm(out32, a16, b16, beta=0.0, alpha=1.0, out_dtype=torch.float32, out=out32)
    ctx.synchronize()
    gemm_s = time.perf_counter() - start
    figures = {
        "shape_mkn": [m, k, n],
        "returns_out": returns_out,
        "dtype": str(result.dtype),
        "relative_error": error,
        "tolerance": ADDMM_TOLERANCE,
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "gemm_s": gemm_s,
        "roofline_gemm_s": roofline_gemm_seconds(m, k, n),
    }
    print(
        f"    relative error {error:.2e} (tolerance {ADDMM_TOLERANCE:.0e}); a beta=0 call took "
        f"{milliseconds(gemm_s)}, the roofline's {milliseconds(figures['roofline_gemm_s'])}"
    )
    if not (returns_out and result.dtype == torch.float32 and error <= ADDMM_TOLERANCE):
        raise CheckFailed(f"addmm with out_dtype: {figures}")
    return figures


def gpu_tests(ctx: Context) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "not interpreter",
            f"--junitxml={junit}",
            "tests/kernels/test_gpu.py",
        ]
        print(f"    {' '.join(command[1:])}")
        proc = subprocess.run(command, cwd=harness.REPO, capture_output=True, text=True, timeout=TESTS_TIMEOUT_S)
        print("\n".join("    | " + line for line in (proc.stdout + proc.stderr).strip().splitlines()[-25:]))
        if not junit.exists():
            raise CheckFailed(f"pytest exited with code {proc.returncode} and wrote no report")
        root = ElementTree.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in suite.iter("testcase"):
        for problem in case:
            if problem.tag in ("failure", "error"):
                message = (problem.get("message") or problem.tag).splitlines() or [problem.tag]
                failed.append(f"{case.get('name')}: {message[0][:200]}")
    figures = {
        **counts,
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": failed,
        "returncode": proc.returncode,
    }
    if proc.returncode != 0:
        raise CheckFailed(f"pytest exited with code {proc.returncode}: {failed}")
    return figures


def _triton_kernel_names() -> set[str]:
    """The names of the library's Triton kernels (as the profiler shows their launches)."""
    from triton.runtime.jit import JITFunction

    return {
        obj.fn.__name__
        for name, module in sys.modules.items()
        if name.startswith("apo_kernels.kernels")
        for obj in vars(module).values()
        if isinstance(obj, JITFunction)
    }


def _busy_fraction(intervals: list[tuple[int, int]]) -> float:
    """The share of ``[first start, last end]`` covered by the ``(start, end)`` intervals."""
    intervals = sorted(intervals)
    covered, reach = 0, intervals[0][0]
    for start, end in intervals:
        covered += max(0, end - max(start, reach))
        reach = max(reach, end)
    return covered / max(reach - intervals[0][0], 1)


def _host_syncs(ctx: Context, run: Callable[[], object]) -> dict:
    """The synchronizing CUDA operations ``run`` makes, counted from set_sync_debug_mode's warnings, with the
    Python lines that make them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ctx.synchronize()
    syncs = [w for w in caught if SYNC_WARNING in str(w.message)]

    def where(w) -> str:
        path = Path(w.filename)
        return f"{path.relative_to(harness.REPO) if path.is_relative_to(harness.REPO) else path}:{w.lineno}"

    return {"host_syncs": len(syncs), "host_sync_sources": collections.Counter(map(where, syncs)).most_common(12)}


def _kernel_profile(ctx: Context, run: Callable[[], object]) -> dict:
    """Kernel launches of ``run`` from torch.profiler: all, the library's Triton kernels, host-to-device copies,
    and the share of the span from the first kernel to the last in which a kernel runs."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        run()
        ctx.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    device_events = [e for e in prof.profiler.kineto_results.events() if e.device_type() == cuda]
    kernels = [e for e in device_events if not e.name().startswith(("Memcpy", "Memset"))]
    triton_names = _triton_kernel_names()
    return {
        "kernels": len(kernels),
        "triton_launches": sum(e.name() in triton_names for e in kernels),
        "host_to_device_copies": sum(e.name().startswith("Memcpy HtoD") for e in device_events),
        "kernel_time_s": sum(e.duration_ns() for e in kernels) / 1e9,
        "gpu_busy_fraction": _busy_fraction([(e.start_ns(), e.start_ns() + e.duration_ns()) for e in kernels])
        if kernels
        else None,
    }


def apo_loss_step(ctx: Context) -> dict:
    args = ctx.args
    case = harness.Case("apo_kernels", "fwd+bwd", ctx.device.type, "bfloat16", args.tokens, args.hidden, args.vocab)
    inputs = harness.make_inputs(case)
    step = impls.build_step(case.impl, case.pass_, case.device)  # apo_loss(backend="auto"), beta 0.04, token-mean

    def one_step():
        inputs.clear_grads()
        return harness.run_pass(step, inputs, case)

    def timed() -> float:
        ctx.synchronize()
        start = time.perf_counter()
        one_step()
        ctx.synchronize()
        return time.perf_counter() - start

    warmup_s = timed()  # compiles the Triton kernels
    samples = [timed() for _ in range(TIMED_STEPS)]
    roofline_s, sweep = roofline_step_seconds(args.tokens, args.hidden, args.vocab)
    figures = {
        "warmup_s": warmup_s,
        "step_s": statistics.median(samples),
        "step_samples_s": samples,
        "roofline_step_s": roofline_s,
        "roofline_sweep": sweep,
    }
    figures["step_over_roofline"] = figures["step_s"] / roofline_s
    print(
        f"    step {milliseconds(figures['step_s'])} (median of {TIMED_STEPS}, warm-up {warmup_s:.2f} s); the "
        f"roofline's {milliseconds(roofline_s)} ({sweep}): {figures['step_over_roofline']:.3g}x"
    )
    if not ctx.cuda:
        figures["not_measured"] = "peak memory, host syncs and the kernel profile: CUDA only"
        print(f"    {figures['not_measured']}")
        return figures

    inputs.clear_grads()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    one_step()
    torch.cuda.synchronize()
    budget = plan.default_workspace_bytes(ctx.device)
    extra = torch.cuda.max_memory_allocated() - before - inputs.grads_nbytes()
    figures.update(extra_bytes=extra, workspace_bytes=budget, extra_over_workspace=extra / budget)
    figures.update(_host_syncs(ctx, one_step))
    figures.update(_kernel_profile(ctx, one_step))
    figures["targets"] = {
        f"host syncs <= {MAX_HOST_SYNCS} per call": figures["host_syncs"] <= MAX_HOST_SYNCS,
        "extra memory <= workspace_bytes": extra <= budget,
        f"Triton launches <= {MAX_TRITON_LAUNCHES} per call": figures["triton_launches"] <= MAX_TRITON_LAUNCHES,
    }
    print(
        f"    extra memory {report.format_bytes(extra)} beyond inputs and gradients, budget "
        f"{report.format_bytes(budget)} ({extra / budget:.0%})"
    )
    print(
        f"    {figures['host_syncs']} host syncs: "
        + ", ".join(f"{n} at {line}" for line, n in figures["host_sync_sources"])
    )
    busy = figures["gpu_busy_fraction"]
    print(
        f"    {figures['kernels']} kernels, {figures['triton_launches']} of them Triton, "
        f"{figures['host_to_device_copies']} host-to-device copies, GPU busy "
        f"{'-' if busy is None else f'{busy:.0%}'} of the span from the first kernel to the last"
    )
    for target, met in figures["targets"].items():
        print(f"    target {target}: {'met' if met else 'MISSED'}")
    return figures


def compiled_call(ctx: Context) -> dict:
    args = ctx.args
    tokens = min(COMPILE_TOKENS, args.tokens)
    case = harness.Case("apo_kernels", "fwd+bwd", ctx.device.type, "bfloat16", tokens, args.hidden, args.vocab)
    inputs = harness.make_inputs(case)
    step = impls.build_step(case.impl, case.pass_, case.device)

    def run(fn) -> list[torch.Tensor]:
        inputs.clear_grads()
        loss = fn(inputs)
        loss.backward()
        ctx.synchronize()
        return [loss.detach(), inputs.hidden.grad, inputs.weight.grad]

    torch._dynamo.reset()
    eager = run(step)
    compiled = torch.compile(step, fullgraph=True, backend=args.compile_backend)
    start = time.perf_counter()
    first = run(compiled)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    run(compiled)
    again_s = time.perf_counter() - start
    errors = {name: relative_error(c, e) for name, c, e in zip(("loss", "d_hidden", "d_weight"), first, eager)}
    figures = {
        "tokens": tokens,
        "backend": args.compile_backend,
        "first_call_s": first_s,
        "second_call_s": again_s,
        "relative_errors": errors,
        "tolerances": COMPILE_TOLERANCE,
    }
    print(
        f"    {args.compile_backend}: first call (compiling) {first_s:.1f} s, second {milliseconds(again_s)}; "
        f"relative errors against eager: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    )
    bad = {name: err for name, err in errors.items() if err > COMPILE_TOLERANCE["loss" if name == "loss" else "grads"]}
    if bad:
        raise CheckFailed(f"compiled differs from eager: {bad}")
    return figures


def steps(args: argparse.Namespace) -> list[Step]:
    roofline_s, sweep = roofline_step_seconds(args.tokens, args.hidden, args.vocab)
    steps_run = 1 + TIMED_STEPS + 3  # warm-up, timed, memory, syncs, profiled
    compile_s = {"inductor": 40.0, "aot_eager": 5.0}.get(args.compile_backend, 40.0)
    m, k, n = ADDMM_SHAPE
    gemm_s = roofline_gemm_seconds(m, k, n)
    return [
        Step("versions", versions, 5.0, "guess: torch import and a CUDA context in a child process"),
        Step(
            "addmm_out_dtype",
            addmm_out_dtype,
            2.0,
            f"guess for cuBLAS's first-call setup; the GEMMs themselves: 2 x {milliseconds(gemm_s)} (roofline, "
            f"{roofline.MM_EFFICIENCY:.0%} of the bf16 peak)",
        ),
        Step(
            "gpu_tests",
            gpu_tests,
            50.0,
            "guess: pytest and imports (~10 s), Triton compiling ~10 kernel variants (~1 s each), two aot_eager "
            "traces (~10 s each); the GPU work in the tests is under 1 s by the roofline",
        ),
        Step(
            "apo_loss_step",
            apo_loss_step,
            12.0 + steps_run * roofline_s,
            f"{steps_run} steps at the roofline's {milliseconds(roofline_s)} ({sweep}, N = {args.tokens}) plus a "
            "guessed 12 s for drawing the inputs and compiling the Triton kernels",
        ),
        Step(
            "compiled_call",
            compiled_call,
            compile_s,
            f"guess: {args.compile_backend} compiling the forward and backward graphs; the calls are "
            "milliseconds by the roofline",
        ),
    ]


# --- running them ---------------------------------------------------------------------------------------


def results_path(args: argparse.Namespace, env: dict) -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    return args.out_dir / f"{NAME}-{harness.device_tag(env)}-{stamp}.json"


def write(path: Path, ctx: Context, records: list[dict], complete: bool) -> None:
    args = ctx.args
    settings = {name: getattr(args, name) for name in ("device", "tokens", "hidden", "vocab", "compile_backend")}
    settings.update(
        dtype="bfloat16",
        beta=impls.BETA,
        group_size=harness.GROUP_SIZE,
        compile_tokens=min(COMPILE_TOKENS, args.tokens),
        estimates_for=GPU,
    )
    results = {
        "environment": ctx.environment,
        "settings": settings,
        "complete": complete,
        "failed": [r["name"] for r in records if r["status"] == "failed"],
        "steps": records,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")


def run_step(step: Step, ctx: Context) -> dict:
    record = {
        "name": step.name,
        "status": "ok",
        "note": None,
        "estimate_s": step.estimate_s,
        "estimate_basis": step.basis,
        "measured_s": None,
        "figures": {},
    }
    start = time.perf_counter()
    try:
        record["figures"] = step.run(ctx)
    except Skipped as exc:
        record.update(status="skipped", note=str(exc))
    except Exception as exc:  # noqa: BLE001  (recorded: the next step runs)
        traceback.print_exc()
        record.update(status="failed", note=f"{type(exc).__name__}: {str(exc)[:2000]}")
    record["measured_s"] = time.perf_counter() - start
    if ctx.cuda:
        torch.cuda.empty_cache()
    return record


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    parser.add_argument(
        "--tokens",
        type=int,
        default=32768,
        help=f"N of the apo_loss step, a multiple of {harness.GROUP_SIZE} (default: %(default)s)",
    )
    parser.add_argument("--hidden", type=int, default=2048, help="D (default: %(default)s)")
    parser.add_argument("--vocab", type=int, default=151936, help="V (default: %(default)s)")
    parser.add_argument(
        "--compile-backend",
        help="torch.compile backend of the compiled call (default: inductor "
        "on cuda, aot_eager on cpu, where inductor needs a C++ toolchain and minutes)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        help=f"where the JSON goes (default: ${harness.OUT_ENV} when set, "
        f"else {harness.RESULTS_DIR.relative_to(harness.REPO)})",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the steps and their estimates, run nothing")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        parser.error("--device cuda: CUDA is not available")
    if args.tokens <= 0 or args.tokens % harness.GROUP_SIZE:
        parser.error(f"--tokens must be a positive multiple of {harness.GROUP_SIZE}, got {args.tokens}")
    args.compile_backend = args.compile_backend or ("inductor" if args.device == "cuda" else "aot_eager")
    out = os.environ.get(harness.OUT_ENV)
    args.out_dir = args.out_dir or (Path(out) if out else harness.RESULTS_DIR)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    plan = steps(args)
    total = sum(step.estimate_s for step in plan)
    print(
        f"{NAME} on {args.device}: apo_loss at N = {args.tokens}, D = {args.hidden}, V = {args.vocab}, bf16; "
        f"{len(plan)} steps, about {total:.0f} s estimated on an {GPU}"
    )
    if args.dry_run:
        for step in plan:
            print(f"  {step.name}: ~{step.estimate_s:.0f} s ({step.basis})")
        return 0
    # Until the versions step has read the whole environment.
    now = datetime.datetime.now(datetime.timezone.utc)
    started = {"date": now.isoformat(timespec="seconds"), "device": args.device}
    ctx = Context(args, torch.device(args.device), started)
    records = []
    for index, step in enumerate(plan, 1):
        print(
            f"\n==> [{index}/{len(plan)}] {step.name}: estimated ~{step.estimate_s:.1f} s on an {GPU} ({step.basis})",
            flush=True,
        )
        record = run_step(step, ctx)
        records.append(record)
        print(
            f"    measured {record['measured_s']:.1f} s: {record['status']}"
            + (f" ({record['note']})" if record["note"] else ""),
            flush=True,
        )
        path = results_path(args, ctx.environment)  # the GPU's name is known after the versions step
        write(path, ctx, records, complete=False)
    write(path, ctx, records, complete=True)
    print("\n==> summary (estimated on an H200 / measured here):")
    for record in records:
        print(
            f"  {record['name']:<16} {record['status']:<8} ~{record['estimate_s']:6.1f} s / "
            f"{record['measured_s']:6.1f} s"
        )
    print(f"wrote {path.resolve()}")
    return 1 if any(r["status"] == "failed" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
