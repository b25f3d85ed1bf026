"""``benchmarks/gpu_first_check.py`` runs on CPU at a tiny shape (every step that makes sense there; the
CUDA-only ones skip with their reason) and writes its JSON under ``$OUT``; a step that fails is recorded and
the next one runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_first_check.py"
STEPS = ["versions", "addmm_out_dtype", "gpu_tests", "apo_loss_step", "compiled_call"]


@pytest.fixture
def first_check(monkeypatch):
    """The script as a module (it imports its neighbours ``harness``, ``impls``, ``report`` and ``roofline`` by
    name)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu_first_check

    return gpu_first_check


def test_on_cpu_every_step_that_can_runs_and_the_json_holds_the_figures(tmp_path):
    # As a user runs it: no interpreter switch of the test session; $OUT as on a GPU machine of the device tool.
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OUT": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--tokens", "64", "--hidden", "32", "--vocab", "300"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("gpu_first_check-cpu-*.json")
    assert f"wrote {path}" in proc.stdout
    results = json.loads(path.read_text())
    assert results["complete"] and results["failed"] == []
    assert {"date", "git_commit", "versions", "cpu"} <= results["environment"].keys()
    assert (
        results["settings"] | {"tokens": 64, "hidden": 32, "vocab": 300, "compile_backend": "aot_eager"}
        == results["settings"]
    )
    steps = {step["name"]: step for step in results["steps"]}
    assert list(steps) == STEPS
    for step in steps.values():
        assert step["estimate_s"] > 0 and step["estimate_basis"] and step["measured_s"] >= 0, step
        assert f"==> [{STEPS.index(step['name']) + 1}/5] {step['name']}: estimated ~" in proc.stdout
    assert steps["versions"]["figures"]["torch"] == results["environment"]["versions"]["torch"]
    addmm = steps["addmm_out_dtype"]
    assert addmm["status"] == "skipped" and "CUDA-only" in addmm["note"]
    tests = steps["gpu_tests"]
    assert tests["status"] == "ok" and tests["figures"]["failures"] == tests["figures"]["errors"] == 0
    assert tests["figures"]["passed"] >= 1 and tests["figures"]["skipped"] >= 1  # the CUDA tests skip on CPU
    step = steps["apo_loss_step"]
    assert step["status"] == "ok" and step["figures"]["step_s"] > 0 and step["figures"]["roofline_step_s"] > 0
    assert "CUDA only" in step["figures"]["not_measured"] and "host_syncs" not in step["figures"]
    compiled = steps["compiled_call"]
    assert compiled["status"] == "ok" and compiled["figures"]["tokens"] == 64
    assert all(error <= 2e-2 for error in compiled["figures"]["relative_errors"].values())


def test_a_failing_step_is_recorded_and_the_next_one_runs(first_check, monkeypatch, tmp_path, capsys):
    def fails(ctx):
        raise RuntimeError("broken on purpose")

    def skips(ctx):
        raise first_check.Skipped("not here")

    monkeypatch.setattr(
        first_check,
        "steps",
        lambda args: [
            first_check.Step("fails", fails, 1.0, "a guess"),
            first_check.Step("skips", skips, 1.0, "a guess"),
            first_check.Step("runs", lambda ctx: {"answer": 42}, 2.0, "a guess"),
        ],
    )
    assert first_check.main(["--device", "cpu", "--out-dir", str(tmp_path)]) == 1
    (path,) = tmp_path.glob("gpu_first_check-cpu-*.json")
    results = json.loads(path.read_text())
    assert results["complete"] and results["failed"] == ["fails"]
    assert [(s["name"], s["status"]) for s in results["steps"]] == [
        ("fails", "failed"),
        ("skips", "skipped"),
        ("runs", "ok"),
    ]
    assert results["steps"][0]["note"] == "RuntimeError: broken on purpose"
    assert results["steps"][1]["note"] == "not here" and results["steps"][2]["figures"] == {"answer": 42}
    assert "measured" in capsys.readouterr().out


def test_the_estimates_fit_two_minutes_at_the_qwen_shape(first_check):
    args = first_check.parse_args(["--device", "cuda", "--dry-run"])  # parses without a GPU
    plan = first_check.steps(args)
    assert [step.name for step in plan] == STEPS
    assert sum(step.estimate_s for step in plan) <= 120
    roofline_s, sweep = first_check.roofline_step_seconds(32768, 2048, 151936)
    assert sweep == "one-pass" and f"{first_check.milliseconds(roofline_s)} (one-pass, N = 32768)" in plan[3].basis


def test_busy_fraction_counts_overlapping_kernels_once(first_check):
    assert first_check._busy_fraction([(20, 30), (0, 10), (5, 12)]) == pytest.approx(22 / 30)
    assert first_check._busy_fraction([(0, 5)]) == 1.0
