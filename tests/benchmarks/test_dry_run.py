"""The CUDA path at the Qwen2.5-VL-3B head (D = 2048, V = 151936, N = 32768, the default workspace of an
80 GB GPU) meets issue 22's targets, measured by ``benchmarks/dry_run.py`` on meta tensors taking the CUDA
branches (no GPU needed): eager calls take extra memory within ``workspace_bytes`` and the driver's bound; no
host sync inside the sweep and at most 2 per call outside it; at most 100 Triton launches per call; eager
launches that skip the custom ops' dispatch; the compiled CUDA path traces (G15; torch 2.11's addmm with
out_dtype did not).

Not asserted, measured: the issue's "1/40 of the materialized reference's logits and their gradient" (39.8 GB
at N = 32768). One pass spends the budget by design (4.95 GiB, 1/7.5; its float32 dW alone is 1/32) and two
passes take 1.03 GiB (1/36). Nor the memory of the compiled cases: ``aot_eager`` runs the functionalized graph
without re-inplacing, so every write into the sweep's buffers becomes a copy (2-4x the plan); inductor, what a
GPU would run, cannot run on meta tensors.

The script runs in a subprocess whose environment has no ``TRITON_INTERPRET`` (which conftest sets on CPU,
and under which the kernels are not recorded). The full grid (fp16, N = 4096 and 262144, the H200) is the
script's; these are the default path and its alternatives at the headline size.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPT = BENCHMARKS / "dry_run.py"
CASES = [
    "apo_loss:one-pass:eager:bf16:32768:80GB",
    "apo_loss:two-pass:eager:bf16:32768:80GB",
    "apo_loss:one-pass:eager:fp32:32768:80GB",  # G12: float32 inputs in one pass
    "fused_linear_logprobs:two-pass:eager:bf16:32768:80GB",
    "apo_loss:one-pass:compile:bf16:32768:80GB",  # G15: the compiled CUDA path (aot_eager)
]
EAGER_CASES = [case for case in CASES if ":eager:" in case]
ROW_KERNELS = {"_logprob_fold_kernel", "_logit_grad_kernel"}


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    json_path = tmp_path_factory.mktemp("dry_run") / "dry_run.json"
    args = [arg for case in CASES for arg in ("--case", case)]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--json", str(json_path)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=900,
    )
    assert json_path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    found = {}
    for r in json.loads(json_path.read_text())["records"]:
        found[":".join(str(r[k]) for k in ("entry", "sweep", "mode", "dtype", "tokens", "gpu"))] = r
    assert set(found) == set(CASES)
    return found


@pytest.fixture(params=CASES)
def record(request, records):
    r = records[request.param]
    assert r["status"] == "ok", r["error"]
    return r


def test_measures_the_sweep(record):
    """Not vacuous: the row kernels launched, and the call held memory beyond its inputs."""
    assert ROW_KERNELS <= set(record["launches_per_kernel"]), record["launches_per_kernel"]
    assert record["extra_bytes"] > 0


@pytest.mark.parametrize("case", EAGER_CASES)
def test_eager_extra_memory_within_the_budget_and_the_formula(records, case):
    record = records[case]
    extra, at_peak = record["extra_bytes"], record["live_at_peak"]
    assert extra <= record["workspace_bytes"], f"{extra} > workspace_bytes {record['workspace_bytes']}: {at_peak}"
    assert record["formula_bytes"] is not None, "the plan states no extra_bytes"
    assert extra <= record["formula_bytes"], f"{extra} > SweepPlan.extra_bytes {record['formula_bytes']}: {at_peak}"


def test_no_host_sync_in_the_sweep_and_at_most_2_outside(record):
    syncs, where = record["syncs"], record["sync_sites"]
    assert syncs["sweep"] == 0, where
    assert syncs["validation"] + syncs["other"] <= 2, where


def test_at_most_100_launches_per_call(record):
    assert record["launches"] <= 100, record["launches_per_kernel"]


@pytest.mark.parametrize("case", EAGER_CASES)
def test_eager_launches_skip_the_custom_op_dispatch(records, case):
    """Compiled graphs launch through the custom ops (what the graph sees); eager calls need not (~20 us each)."""
    assert records[case]["launches_through_custom_ops"] == 0


def test_monitor_counts_known_allocations_and_syncs():
    """The instrument itself, on allocations and syncs whose sizes and counts are known."""
    code = textwrap.dedent("""
        import json, sys
        sys.path.insert(0, sys.argv[1])
        import torch, dry_run
        monitor = dry_run.DeviceMonitor()
        with dry_run.as_on_a_gpu(dry_run.GPUS["80GB"], []), dry_run.measuring(monitor):
            a = torch.empty(1000, device="meta")                         # 4000 bytes
            b = torch.empty(250, dtype=torch.float64, device="meta")     # 2000: 6000 live
            view = a[10:20]
            a.add_(1)                                                    # in place: nothing new
            del a                                                        # the view keeps its storage
            c = torch.empty(500, device="meta")                          # 2000: 8000 live, the peak
            c_allocation = monitor.allocation_of(c)
            del view, b, c
            d = torch.empty(100, device="meta")                          # 400
            torch.tensor([1, 2, 3], device="meta")                       # a host-to-device copy
            torch.ones(3).to("meta")                                     # another
            flag = bool(torch.ones((), dtype=torch.bool, device="meta"))  # a read, answered True
            rows = torch.ones(4, 2, dtype=torch.bool, device="meta").nonzero().shape  # every element
        print(json.dumps(dict(peak=monitor.peak(set())[0], peak_without_c=monitor.peak({c_allocation})[0],
                              syncs=len(monitor.syncs), flag=flag, rows=list(rows))))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(BENCHMARKS)], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found == dict(peak=8000, peak_without_c=6000, syncs=4, flag=True, rows=[8, 2])
