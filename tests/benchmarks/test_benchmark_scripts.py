"""The benchmark scripts still run end to end on CPU at tiny sizes, their JSON and plot written.

Each case is a fresh interpreter (seconds each), so memory.py runs every implementation at one size and
speed.py, whose cases differ only in what they time, two implementations at two sizes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
COMMON_FIELDS = {"impl", "device", "dtype", "tokens", "hidden", "vocab", "status", "note"}
SCRIPT_FIELDS = {
    "memory": {"peak_bytes", "extra_bytes", "time_s", "loss"},
    "speed": {"forward_s", "backward_s", "total_s", "tflops", "matmul_tflops", "matmul_share"},
}
SWEEPS = {
    "memory": (["reference", "apo_kernels", "apo_kernels-torch", "liger", "trl"], [16]),
    "speed": (["reference", "apo_kernels"], [8, 16]),
}


@pytest.mark.parametrize("script", sorted(SCRIPT_FIELDS))
def test_script_writes_records_and_plot(script, tmp_path):
    impls, tokens = SWEEPS[script]
    json_path, plot_path = tmp_path / "results.json", tmp_path / "plot.png"
    # Benchmarks run as users run them: the test session's Triton interpreter switch is not theirs.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), "--device", "cpu", "--hidden", "16", "--vocab", "64",
         "--dtype", "float32", "--tokens", *map(str, tokens), "--impls", *impls,
         "--json", str(json_path), "--plot", str(plot_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| tokens |" in proc.stdout

    results = json.loads(json_path.read_text())
    assert {"date", "device", "git_commit", "versions"} <= results["environment"].keys()
    records = results["records"]
    assert sorted((r["tokens"], r["impl"]) for r in records) == sorted((n, i) for n in tokens for i in impls)
    for record in records:
        assert record.keys() == COMMON_FIELDS | SCRIPT_FIELDS[script]
        assert record["status"] in ("ok", "oom", "skipped")
        assert (record["device"], record["hidden"], record["vocab"]) == ("cpu", 16, 64)
        if record["status"] == "ok":
            measured = [record[f] for f in SCRIPT_FIELDS[script] if not f.startswith("matmul")]
            assert all(value is not None and value >= 0 for value in measured), record
    # The reference and our own paths have no optional dependency: they must have run.
    assert all(r["status"] == "ok" for r in records if r["impl"] in ("reference", "apo_kernels", "apo_kernels-torch"))
    assert plot_path.stat().st_size > 0
    if script == "memory":
        # Every implementation computes the same loss on the same inputs: the comparison is like for like.
        losses = [r["loss"] for r in records if r["status"] == "ok"]
        assert max(losses) - min(losses) <= 1e-4 * max(1.0, abs(losses[0])), records
