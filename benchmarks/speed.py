"""Time of each pass per implementation: forward only (log-probs under no_grad), and the loss step.

    python benchmarks/speed.py                      # defaults of the device (cuda if available, else cpu)
    python benchmarks/speed.py --tokens 4096 16384 --impls apo_kernels liger --passes fwd --json out.json

Results (JSON and PNG) go to ./benchmark-results/ in the current directory (git-ignored) unless
``--out-dir``, ``--json`` or ``--plot`` say otherwise; ``--out-dir benchmarks/results`` refreshes the
committed reference results.

Same cases and options as ``memory.py`` (see ``impls.py`` for what each implementation runs in each pass),
except that on cpu the default sweep stops at 2048 tokens (``CPU_TOKENS``), so it ends in minutes on 2 cores.

- cuda: ``triton.testing.do_bench`` medians of the repetitions that fit in ``BENCH_REP_MS``. fwd: the pass.
  fwd+bwd: the forward (building the loss), the backward (``loss.backward(retain_graph=True)`` on one graph,
  gradients reset between calls) and the total (a fresh forward and backward).
- cpu: medians over ``CPU_REPEATS`` passes after ``CPU_WARMUP``, each fwd+bwd step timed in its forward and
  its backward; the total is the pass.

Liger computes the gradients inside its forward and only hands them over in backward: compare totals.

``tflops`` is the model arithmetic of the pass per second of total time, the same count for every
implementation (``flops`` in the record): 2 N D V for fwd (the logits GEMM) and 6 N D V for fwd+bwd (the
least a loss step needs: the logits GEMM and the d hidden and d weight GEMMs). A two-pass implementation
(``apo_kernels-two-pass``, TRL) recomputes the logits in backward, 8 N D V, more than it is credited with.
On cuda ``matmul_share`` is ``tflops`` over ``matmul_tflops``, the rate of a plain bf16 GEMM measured in the
same process with the pass's shape, ``(N x D) @ (D x min(V, 8192))``, writing float32 as the library's GEMMs
do (``torch.mm(..., out_dtype=torch.float32)``).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Optional

import torch

import harness
import report
import sweep
from harness import Case
from impls import Inputs, Step

METRICS = ("forward_s", "backward_s", "total_s", "flops", "tflops", "matmul_tflops", "matmul_share")
CPU_WARMUP = 1
CPU_REPEATS = 3
CPU_TOKENS = [512, 1024, 2048]  # 2048: the shape of the one-pass target (issue 13)
MATMUL_PROBE_COLUMNS = 8192
# do_bench times as many repetitions as fit in this many milliseconds, after 1 + 5 calls (the estimate) and
# its 25 ms of warm-up: at least 10 samples of a ~100 ms step, where its default (100 ms) takes a single one.
# A timed phase then costs about 1.1 s, up to ~8 s for a ~1 s step (the reference's float32 GEMMs at 32768
# tokens, which still gets one sample).
BENCH_REP_MS = 1000

Times = tuple[float, Optional[float], float]  # forward, backward (None for fwd), total, in seconds


def _cuda_times(step: Step, inputs: Inputs, case: Case) -> Times:
    from triton.testing import do_bench

    def median_s(fn, **kw) -> float:
        return do_bench(fn, rep=BENCH_REP_MS, return_mode="median", **kw) / 1e3  # do_bench: ms

    params = [inputs.hidden, inputs.weight]
    forward = median_s(lambda: step(inputs))
    if case.pass_ == "fwd":
        return forward, None, forward
    loss = step(inputs)
    backward = median_s(lambda: loss.backward(retain_graph=True), grad_to_none=params)
    loss = None  # frees the graph before the next measurement
    total = median_s(lambda: step(inputs).backward(), grad_to_none=params)
    return forward, backward, total


def _cpu_times(step: Step, inputs: Inputs, case: Case) -> Times:
    samples = []
    for _ in range(CPU_WARMUP + CPU_REPEATS):
        inputs.clear_grads()
        start = time.perf_counter()
        out = step(inputs)
        forward_end = time.perf_counter()
        if case.pass_ == "fwd+bwd":
            out.backward()
        end = time.perf_counter()
        samples.append((forward_end - start, end - forward_end, end - start))
    forward, backward, total = (statistics.median(column) for column in zip(*samples[CPU_WARMUP:]))
    return (forward, backward, total) if case.pass_ == "fwd+bwd" else (total, None, total)


def _matmul_tflops(inputs: Inputs) -> float:
    """The rate of the probe GEMM (a few ms: do_bench's default time takes dozens of samples)."""
    from triton.testing import do_bench

    hidden = inputs.hidden.detach().reshape(-1, inputs.hidden.shape[-1]).to(torch.bfloat16)
    weight = inputs.weight.detach()[:MATMUL_PROBE_COLUMNS].to(torch.bfloat16)
    seconds = do_bench(lambda: torch.mm(hidden, weight.T, out_dtype=torch.float32), return_mode="median") / 1e3
    return 2 * hidden.shape[0] * hidden.shape[1] * weight.shape[0] / seconds / 1e12


def measure(step: Step, inputs: Inputs, case: Case) -> dict:
    forward, backward, total = (_cuda_times if case.device == "cuda" else _cpu_times)(step, inputs, case)
    flops = harness.model_flops(case)
    tflops = flops / total / 1e12
    record = {"forward_s": forward, "backward_s": backward, "total_s": total, "flops": flops, "tflops": tflops}
    if case.device == "cuda":
        matmul = _matmul_tflops(inputs)
        record.update(matmul_tflops=matmul, matmul_share=tflops / matmul)
    return record


def _format_seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _format_tflops(tflops: float) -> str:
    return f"{tflops:.3g} TFLOP/s" if tflops < 100 else f"{tflops:.0f} TFLOP/s"


def _matmul_share(record: dict) -> Optional[str]:
    return None if record["matmul_share"] is None else f"{record['matmul_share']:.0%} of a bf16 GEMM's rate"


def _times(record: dict) -> str:
    """``total`` for fwd, ``forward + backward = total`` for fwd+bwd."""
    if record["backward_s"] is None:
        return _format_seconds(record["total_s"])
    forward, backward, total = (_format_seconds(record[name]) for name in ("forward_s", "backward_s", "total_s"))
    return f"{forward} + {backward} = {total}"


def _describe(record: dict) -> str:
    if record["status"] != "ok":
        return f"{record['status']}: {record['note']}"
    return f"{_times(record)}, {record['tflops']:.2f} TFLOP/s ({harness.flops_formula(record['pass'])})"


def _cell(record: dict) -> str:
    share = "" if record["matmul_share"] is None else f", {record['matmul_share']:.0%} of bf16 mm"
    return f"{_times(record)} ({record['tflops']:.2f} TFLOP/s{share})"


SCRIPT = sweep.Script(
    name="speed",
    path=Path(__file__),
    description=__doc__.splitlines()[0],
    title="Time of one pass",
    cells=(
        "fwd: time; fwd+bwd: forward + backward = total; model TFLOP/s counting "
        + " and ".join(f"{harness.flops_formula(p)} for {p}" for p in harness.PASSES)
        + " (the same for every implementation); on cuda the share of a plain bf16 GEMM's rate (float32 out)"
    ),
    measure=measure,
    metrics=METRICS,
    describe=_describe,
    cell=_cell,
    panels=[
        report.Panel(
            "total_s",
            "time of the pass ({unit})",
            report.SECOND_UNITS,
            _format_seconds,
            compare=("{}x faster", "{}x slower", "about as fast"),
        ),
        report.Panel(
            "tflops", "model TFLOP/s ({flops} / time)", (("TFLOP/s", 1.0),), _format_tflops, detail=_matmul_share
        ),
    ],
    cpu_tokens=CPU_TOKENS,
)


if __name__ == "__main__":
    sweep.run_script(SCRIPT)
