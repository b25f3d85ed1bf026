"""Peak memory of each pass per implementation: forward only (log-probs under no_grad), and the loss step.

    python benchmarks/memory.py                     # defaults of the device (cuda if available, else cpu)
    python benchmarks/memory.py --tokens 1024 4096 --impls reference apo_kernels --passes fwd+bwd --json out.json

Results (JSON and PNG) go to ./benchmark-results/ in the current directory (git-ignored) unless
``--out-dir``, ``--json`` or ``--plot`` say otherwise; ``--out-dir benchmarks/results`` refreshes the
committed reference results.

The fwd pass computes the log-probs of the sampled tokens from hidden states under ``torch.no_grad``. The
fwd+bwd pass computes them, the k3 KL against reference log-probs and the clipped policy term, token-mean
aggregated, then backpropagates into ``hidden`` and ``weight`` (see ``impls.py`` for what each
implementation runs).

How the peak is measured (``peak_bytes``: the inputs plus the largest rise of allocated memory during the
pass; ``extra_bytes``: ``peak_bytes`` minus the inputs and their gradients, i.e. what the pass itself costs):

- cuda: one warm-up pass first (Triton compilation and autotuning, ``torch.compile`` for Liger, cuBLAS
  workspaces, none of which a training step repeats), gradients cleared, the allocator's peak counter reset;
  the rise is ``torch.cuda.max_memory_allocated()`` minus what was allocated before the pass.
- cpu: PyTorch has no peak counter for host memory, so the pass runs under ``torch.profiler`` with
  ``profile_memory=True``, which records every allocation and free of PyTorch's CPU allocator with its
  size; replaying them in order gives the exact peak of live tensor bytes, every tensor of the pass
  included (autograd's saved tensors, temporaries, gradients). It counts tensor bytes, not the process's
  resident memory: allocator padding, fragmentation, and scratch buffers that BLAS allocates itself are left
  out, which is the same definition as the cuda counter. (The resident-set high-water mark was not used:
  it also counts the profiler's and interpreter's own memory and the pages glibc keeps after a free, and
  misses allocations never touched. Checked once: without the profiler and with
  ``MALLOC_MMAP_THRESHOLD_=65536``, the resident-set rise of a step matched this peak within 1%.) No
  warm-up on cpu: nothing there compiles or autotunes.

``time_s`` is the wall time of the measured pass, for orientation only: on cpu it is a first call (Liger's
can take several times as long as its later ones) under the profiler; ``speed.py`` times properly.
``loss`` (fwd+bwd) is the loss value and ``mean_logp`` (fwd) the mean log-prob, each the same for every
implementation of a case (they compute one thing); the other is None.
A case that runs out of memory is recorded as ``oom``; one whose package is missing as ``skipped``; one that
raised anything else as ``error`` (the script then exits 1).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import harness
import report
import sweep
from harness import Case
from impls import Inputs, Step

METRICS = ("peak_bytes", "extra_bytes", "time_s", "loss", "mean_logp")
# How apo_kernels compares with each other implementation in the figure.
MEMORY_COMPARE = ("uses {}x less", "uses {}x more", "uses about as much")


def _replayed_peak(prof: torch.profiler.profile) -> int:
    """Largest running sum of the CPU allocator's allocation (+) and free (-) events, in time order."""
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure(step: Step, inputs: Inputs, case: Case) -> dict:
    if case.device == "cuda":
        harness.run_pass(step, inputs, case)
        inputs.clear_grads()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = harness.run_pass(step, inputs, case)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        rise = torch.cuda.max_memory_allocated() - before
    else:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            start = time.perf_counter()
            out = harness.run_pass(step, inputs, case)
            elapsed = time.perf_counter() - start
        rise = _replayed_peak(prof)
    peak = inputs.nbytes() + rise
    # The same for every implementation of a case: they compute one thing.
    value = {"loss": out.item()} if case.pass_ == "fwd+bwd" else {"mean_logp": out.float().mean().item()}
    return {
        "peak_bytes": peak,
        "extra_bytes": peak - inputs.nbytes() - inputs.grads_nbytes(),
        "time_s": elapsed,
        **value,
    }


def _describe(record: dict) -> str:
    if record["status"] != "ok":
        return f"{record['status']}: {record['note']}"
    return (
        f"peak {report.format_bytes(record['peak_bytes'])}, extra {report.format_bytes(record['extra_bytes'])}, "
        f"{record['time_s']:.2f} s"
    )


def _cell(record: dict) -> str:
    return f"{report.format_bytes(record['peak_bytes'])} / {report.format_bytes(record['extra_bytes'])}"


def _fused_vs_reference(records: list[dict]) -> str:
    """Per pass, reference peak over the default fused path's at the largest token count where both ran."""
    lines = []
    for pass_ in report.passes_of(records):
        ok = [r for r in records if r["status"] == "ok" and r["pass"] == pass_]
        peaks = {(r["tokens"], r["impl"]): r["peak_bytes"] for r in ok}
        both = [n for (n, impl) in peaks if impl == "reference" and (n, "apo_kernels") in peaks]
        if not both:
            lines.append(f"{pass_}: reference / apo_kernels peak: no token count where both ran")
            continue
        n = max(both)
        lines.append(
            f"{pass_}: reference / apo_kernels peak at {n} tokens: "
            f"{peaks[n, 'reference'] / peaks[n, 'apo_kernels']:.1f}x"
        )
    return "\n".join(lines)


SCRIPT = sweep.Script(
    name="memory",
    path=Path(__file__),
    description=__doc__.splitlines()[0],
    title="Peak memory of one pass",
    cells="peak / extra (peak minus inputs and their gradients)",
    measure=measure,
    metrics=METRICS,
    describe=_describe,
    cell=_cell,
    panels=[
        report.Panel(
            "peak_bytes",
            "peak memory of the pass, inputs included ({unit})",
            report.BYTE_UNITS,
            report.format_bytes,
            compare=MEMORY_COMPARE,
        ),
        report.Panel(
            "extra_bytes",
            "extra memory: peak minus inputs and their gradients ({unit})",
            report.BYTE_UNITS,
            report.format_bytes,
            compare=MEMORY_COMPARE,
        ),
    ],
    summary=_fused_vs_reference,
)


if __name__ == "__main__":
    sweep.run_script(SCRIPT)
