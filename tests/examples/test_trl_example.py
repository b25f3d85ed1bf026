"""The TRL example's command line: ``python examples/trl_apo_qwen2_5_vl.py --tiny`` as a user runs it (a
subprocess), its summary and its exit status; and the checks that decide that status.

(``tests/integrations/trl/test_apo_trainer.py::test_tiny_example_trains_two_steps`` runs the same tiny run in
process and checks the trainer's logs and weights.)
"""

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("trl")

from examples import trl_apo_qwen2_5_vl as example  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "trl_apo_qwen2_5_vl.py"
TIMEOUT_S = 600  # the tiny run takes ~10 s on 2 CPU cores; generous for a loaded CI machine


def run_example(*args, timeout=TIMEOUT_S):
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def summary_value(stdout: str, key: str) -> str:
    match = re.search(rf"^{re.escape(key)}: (.*)$", stdout, re.MULTILINE)
    assert match, f"no '{key}:' line in the summary:\n{stdout}"
    return match.group(1)


def test_tiny_run_prints_a_summary_and_exits_0(tmp_path):
    result = run_example("--tiny", "--output-dir", str(tmp_path), "--max-steps", "2")
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    )
    out = result.stdout
    assert "== APO tiny run summary ==" in out
    assert summary_value(out, "steps").startswith("2 optimizer steps, 2 logged")
    final_loss = float(summary_value(out, "final loss").split()[0])
    assert math.isfinite(final_loss) and "all finite" in summary_value(out, "final loss")
    assert math.isfinite(float(summary_value(out, "mean reward").split()[0]))
    assert "over 2 steps" in summary_value(out, "mean reward")
    logps = summary_value(out, "policy vs reference log-probs, mean |dlogp| per completion token")
    same_weights = re.search(r"step 1 \(before any update, same weights\) (\S+) \(max (\S+)\)", logps)
    assert same_weights and float(same_weights.group(2)) <= example.SAME_WEIGHTS_LOGP_TOL, logps
    changed, total = map(int, re.match(r"(\d+)/(\d+) tensors", summary_value(out, "parameters changed")).groups())
    assert 0 < changed <= total
    assert str(tmp_path / "final") in summary_value(out, "saved")
    assert summary_value(out, "result") == "OK"

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["failures"] == []
    assert summary["final_loss"] == pytest.approx(final_loss, rel=1e-3)
    assert (tmp_path / "final" / "config.json").is_file()
    assert any((tmp_path / "final").glob("*.safetensors"))
    # TRL's training progress bar (tqdm, on stderr) is on.
    assert re.search(r"2/2 \[", result.stderr), result.stderr[-2000:]


def test_an_exception_exits_non_zero(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    result = run_example("--tiny", "--output-dir", str(not_a_dir), timeout=300)
    assert result.returncode != 0 and "Traceback" in result.stderr


def fake_trainer(losses, rewards, changed_params=True):
    """Just what ``summarize`` reads from a trainer, with a one-tensor policy and reference model."""
    import torch

    policy = torch.nn.Linear(2, 2, bias=False)
    reference = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        reference.weight.copy_(policy.weight + (0.1 if changed_params else 0.0))
    logs = [{"loss": loss, "reward": reward, "kl": 0.0} for loss, reward in zip(losses, rewards)]
    return SimpleNamespace(
        state=SimpleNamespace(log_history=logs, global_step=len(losses)),
        model=policy,
        ref_model=reference,
        is_deepspeed_enabled=False,
        is_fsdp_enabled=False,
        accelerator=SimpleNamespace(unwrap_model=lambda m: m),
    )


def test_summary_checks():
    good = example.summarize(fake_trainer([0.5, 0.25], [0.0, 1.0]), None, check_same_weights=True)
    assert good.failures == [] and good.mean_reward == 0.5 and good.params_changed[:2] == (1, 1)
    assert good.lines("t")[-1] == "result: OK"

    nan = example.summarize(fake_trainer([0.5, float("nan")], [0.0, 1.0]), None, check_same_weights=True)
    assert any("non-finite loss" in f for f in nan.failures)
    assert nan.lines("t")[-1].startswith("result: FAILED")

    frozen_trainer = fake_trainer([0.5, 0.25], [0.0, 1.0], changed_params=False)
    frozen = example.summarize(frozen_trainer, None, check_same_weights=True)
    assert frozen.failures == ["no parameter changed"]

    none = example.summarize(fake_trainer([], []), None, check_same_weights=True)
    assert "no optimizer step was taken" in none.failures


def test_same_weights_log_prob_check():
    trainer = fake_trainer([0.5, 0.25], [0.0, 1.0])
    logps = SimpleNamespace(by_step={0: [(1.0, 10.0, 0.5)], 1: [(2.0, 10.0, 0.4)]})
    logps.step_stats = lambda step: example.LogpComparison.step_stats(logps, step)
    summary = example.summarize(trainer, logps, check_same_weights=True)
    assert summary.logp_first == (1, 0.1, 0.5) and summary.logp_last == (2, 0.2, 0.4)
    assert any("before the first update" in f for f in summary.failures)
    assert example.summarize(trainer, logps, check_same_weights=False).failures == []  # e.g. bf16 runs


def test_cli_exits_1_when_a_check_fails(monkeypatch, capsys):
    def failing_main(argv=None):
        raise example.RunFailed("non-finite loss [nan]")

    monkeypatch.setattr(example, "main", failing_main)
    assert example.cli(["--tiny"]) == 1
    assert "non-finite loss" in capsys.readouterr().err
