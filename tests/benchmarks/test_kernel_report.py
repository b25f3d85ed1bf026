"""Every Triton kernel of the GPU path compiles for sm_90 and sm_80 at the Qwen2.5-VL-3B shape without
spilling, within the shared memory of a block and the 255 registers of a thread.

``benchmarks/kernel_report.py`` compiles ahead of time with the ptxas Triton ships, so this runs without a
GPU. It runs once, in a subprocess whose environment has no ``TRITON_INTERPRET`` (which conftest sets on
CPU, and under which nothing is compiled).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_report.py"
KERNELS = {"_logprob_fold_kernel", "_logit_grad_kernel", "_apo_epilogue_kernel"}
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    json_path = tmp_path_factory.mktemp("kernel_report") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "90,80", "--json", str(json_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert json_path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(json_path.read_text())


@pytest.mark.parametrize("arch", sorted(SHARED_LIMIT))
def test_kernels_compile_within_limits(report, arch):
    _, rows = report
    rows = [r for r in rows if r["arch"] == arch]
    assert {r["kernel"] for r in rows} == KERNELS
    for r in rows:
        where = f"{r['kernel']} [{r['variant']}] sm_{arch}"
        assert r["compiled"] and r["error"] is None, f"{where}: {r['error']}"
        assert r["spill_bytes"] == 0, f"{where} spills {r['spill_bytes']} bytes"
        assert r["shared_bytes"] <= SHARED_LIMIT[arch], f"{where} needs {r['shared_bytes']} bytes of shared memory"
        assert 0 < r["registers"] <= 255, f"{where}: {r['registers']} registers"


def test_report_covers_the_one_pass_sweep(report):
    """apo_loss's default path (one pass: row kernels over a chunk's logits, the epilogue per chunk) is compiled too."""
    _, rows = report
    for kernel in KERNELS:
        cases = {launch["case"] for r in rows if r["kernel"] == kernel for launch in r["launches"]}
        assert any("apo_loss one-pass" in case for case in cases), f"{kernel}: {sorted(cases)}"


def test_report_exit_status_and_table(report):
    proc, _ = report
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "_apo_epilogue_kernel" in proc.stdout
