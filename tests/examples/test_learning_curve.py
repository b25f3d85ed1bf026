"""``python examples/learning_curve.py --output-dir DIR`` as the README runs it (a subprocess): its files, a reward
that rises, and a resumed run that continues the curve exactly."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

from examples import learning_curve  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "learning_curve.py"
TIMEOUT_S = 1200  # the default run takes ~2 minutes on 2 CPU cores; generous for a loaded CI machine
CURVE_KEYS = ("step", "reward", "kl", "entropy", "completion_length", "loss")


def run_script(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S
    )


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("curves")
    result = run_script("--output-dir", str(out))
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return out, result


def untimed(point):
    """A curve point without TRL's wall-clock metrics (``step_time``)."""
    return {key: value for key, value in point.items() if "time" not in key}


def mean(values):
    return sum(values) / len(values)


def test_writes_both_curves_a_plot_and_a_summary(default_run):
    out, result = default_run
    curves = json.loads((out / "curves.json").read_text())
    assert sorted(curves) == ["apo", "grpo"]
    for method, points in curves.items():
        assert [p["step"] for p in points] == list(range(1, learning_curve.MAX_STEPS + 1)), method
        for point in points:
            for key in CURVE_KEYS:
                assert math.isfinite(point[key]), (method, point["step"], key)
            assert 0.0 <= point["reward"] <= 1.0 and 1.0 <= point["completion_length"] <= 4.0
    # Same seeds and weights, so the same first step; DADS and STCR make the runs part later.
    assert curves["apo"][0]["reward"] == curves["grpo"][0]["reward"]
    assert curves["apo"][-1]["apo/dads_weight/mean"] < 1.0 and "apo/stcr_frac" in curves["apo"][-1]
    assert not [key for key in curves["grpo"][-1] if "dads" in key or "stcr" in key]  # both off in GRPO
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    run = json.loads((out / "run.json").read_text())
    assert run["max_steps"] == learning_curve.MAX_STEPS and set(run["seconds"]) == {"apo", "grpo"}
    assert "== learning curves summary ==" in result.stdout and "result: OK" in result.stdout
    assert f"{learning_curve.MAX_STEPS}/{learning_curve.MAX_STEPS} [" in result.stderr  # the progress bar


def test_apo_reward_rises_clearly(default_run):
    out, _ = default_run
    rewards = [p["reward"] for p in json.loads((out / "curves.json").read_text())["apo"]]
    first, last = mean(rewards[:10]), mean(rewards[-10:])
    assert last >= first + 0.3, (first, last)


def test_resume_continues_the_curve(default_run, tmp_path):
    """5 steps, then a resume to step 10: the same curve and checkpoint as the uninterrupted default run's."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    out, _ = default_run
    first = run_script("--output-dir", str(tmp_path), "--max-steps", "5", "--save-steps", "5")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_script("--output-dir", str(tmp_path), "--max-steps", "10", "--save-steps", "5", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr

    whole = json.loads((out / "curves.json").read_text())
    continued = json.loads((tmp_path / "curves.json").read_text())
    for method in ("apo", "grpo"):
        assert [untimed(p) for p in continued[method]] == [untimed(p) for p in whole[method][:10]], method
        reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / method / "checkpoint-10")
        expected = dict(
            Qwen2_5_VLForConditionalGeneration.from_pretrained(out / method / "checkpoint-10").named_parameters()
        )
        for name, value in reloaded.named_parameters():
            assert value.equal(expected[name]), (method, name)


def test_colour_reward_reads_the_first_colour_named():
    completions = ["red", "it is blue", "green red", "the picture", "", [{"role": "assistant", "content": "a red"}]]
    solutions = ["red", "blue", "red", "red", "red", "red"]
    assert learning_curve.colour_reward(completions, solutions) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def test_exits_1_when_apo_reward_does_not_rise(tmp_path, monkeypatch, capsys):
    flat = [
        {"step": s, "reward": 0.3, "kl": 0.0, "entropy": 1.0, "completion_length": 4.0}
        for s in range(1, learning_curve.MAX_STEPS + 1)
    ]
    monkeypatch.setattr(learning_curve, "train", lambda *args, **kwargs: flat)
    monkeypatch.setattr(learning_curve.tiny, "build_tiny_processor", lambda: None)
    assert learning_curve.main(["--output-dir", str(tmp_path)]) == 1
    assert "result: FAILED: APO's reward rose by 0.000" in capsys.readouterr().out
