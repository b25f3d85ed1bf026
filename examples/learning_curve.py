"""Learning curves of APO and GRPO on a toy visual task: the tiny Qwen2.5-VL trained through ``APOTrainer`` on a CPU.

    pip install torch==2.13.0 && pip install -e '.[trl]'
    python examples/learning_curve.py --output-dir runs/curves

The task: a picture of one plain colour (red, green or blue) and the question "what colour is the picture ?";
the reward is 1 when the first colour the response names is the picture's, else 0. The tiny random policy
(examples/trl_apo_qwen2_5_vl.py, a 27-token vocabulary, four-token responses) names the right colour first about
one time in five, so most groups hold both right and wrong answers and the advantages are not all zero; to
score higher it has to learn to answer with a colour and to read the colour from the image.

The same run is made twice from the same seeds and initial weights: APO (DADS and STCR on) and GRPO (APO's
special case with both off; everything else equal). Each run logs TRL's metrics every step and saves a checkpoint
every ``--save-steps`` steps under ``DIR/apo`` and ``DIR/grpo``, each loadable with ``from_pretrained``;
``--resume`` continues both runs from their last checkpoints, up to ``--max-steps``. The script writes

- ``DIR/curves.json``: ``{"apo": [{"step": 1, "reward": ..., "kl": ..., "entropy": ..., "completion_length":
  ..., ...}, ...], "grpo": [...]}``, one entry per optimizer step, with every metric TRL logged;
- ``DIR/curves.png``: reward, KL, entropy and response length against step, both methods;
- ``DIR/run.json``: the settings, the time each run took, versions, machine, date and git commit;

and prints a summary. On runs of ``MAX_STEPS`` (150) steps or more it exits with status 1 when APO's reward did
not rise (the mean of its last ``SMOOTHING`` steps over that of its first by less than ``MIN_RISE``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the tiny model and processor of the TRL example
import trl_apo_qwen2_5_vl as tiny  # noqa: E402

METHODS = {"apo": dict(dads=True, stcr=True), "grpo": dict(dads=False, stcr=False)}
#: curves.json names for TRL's logged metrics (the others keep TRL's names)
RENAMED = {"completions/mean_length": "completion_length"}
PLOTTED = (
    ("reward", "reward (accuracy)"),
    ("kl", "KL(policy || reference)"),
    ("entropy", "entropy (nats/token)"),
    ("completion_length", "response length (tokens)"),
)
SMOOTHING = 5  # steps averaged at each end of a curve for the summary and the rise check
MIN_RISE = 0.2  # the least rise of APO's mean reward, first SMOOTHING steps to last, that passes
NUM_PROMPTS = 256
MAX_STEPS = 150


def colour_reward(completions, solution, **kwargs) -> list[float]:
    """1.0 when the first colour word of the response is the picture's colour, else 0.0."""
    rewards = []
    for completion, colour in zip(completions, solution):
        named = [word for word in tiny._text(completion).split() if word in tiny.TINY_COLOURS]
        rewards.append(float(bool(named) and named[0] == colour))
    return rewards


def training_args(method: str, output_dir: Path, max_steps: int, save_steps: int, seed: int):
    from apo_kernels.integrations.trl import APOGRPOConfig

    return APOGRPOConfig(
        **METHODS[method],
        output_dir=str(output_dir),
        beta=1e-3,
        loss_type="bnpo",
        kl_agg_mode="seq-mean-token-mean",
        correctness_threshold=1.0,
        max_steps=max_steps,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,
        num_generations=8,  # 4 prompts x 8 responses per optimizer step, in 2 micro-batches
        max_completion_length=4,
        learning_rate=2e-3,
        lr_scheduler_type="constant",  # so that a resumed run with more steps continues the same curve
        use_cpu=True,
        bf16=False,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=save_steps,
        report_to="none",
        disable_tqdm=False,
    )


def last_checkpoint(run_dir: Path) -> Optional[str]:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None


def train(
    method: str, output_dir: Path, max_steps: int, save_steps: int, resume: bool, seed: int, processor
) -> list[dict]:
    """One run; returns its curve (one entry per optimizer step, resumed steps included)."""
    from apo_kernels.integrations.trl import APOTrainer

    run_dir = output_dir / method
    checkpoint = last_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        print(f"[{method}] no checkpoint under {run_dir}: starting from step 0", file=sys.stderr, flush=True)
    # The initial weights: the same for both methods (built from the seed), loaded from the checkpoint on resume.
    model = tiny.save_tiny_model(processor, str(output_dir), seed)
    trainer = APOTrainer(
        model=model,
        reward_funcs=[colour_reward],
        args=training_args(method, run_dir, max_steps, save_steps, seed),
        train_dataset=tiny.tiny_dataset(num_prompts=NUM_PROMPTS, seed=seed),
        processing_class=processor,
    )
    print(
        f"[{method}] training to step {max_steps}" + (f", resuming from {checkpoint}" if checkpoint else ""),
        file=sys.stderr,
        flush=True,
    )
    trainer.train(resume_from_checkpoint=checkpoint)
    return curve(trainer.state.log_history)


def curve(log_history: list[dict]) -> list[dict]:
    """TRL's per-step logs as curve points: ``step`` first, then every numeric metric."""
    points = []
    for log in log_history:
        if "reward" not in log:  # the end-of-training summary entry
            continue
        point = {"step": int(log["step"])}
        for key, value in log.items():
            if key != "step" and isinstance(value, (int, float)):
                point[RENAMED.get(key, key)] = float(value)
        points.append(point)
    return points


def ends(points: list[dict], key: str) -> tuple[float, float]:
    """Mean of ``key`` over the first and over the last ``SMOOTHING`` points."""
    values = [p[key] for p in points if key in p]
    n = min(SMOOTHING, len(values))
    return sum(values[:n]) / n, sum(values[-n:]) / n


def plot(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    styles = {"apo": dict(color="tab:red"), "grpo": dict(color="tab:blue", linestyle="--")}
    for ax, (key, label) in zip(axes.flat, PLOTTED):
        for method, points in curves.items():
            steps = [p["step"] for p in points if key in p]
            values = [p[key] for p in points if key in p]
            if key == "reward":  # noisy per step: the raw values faint, a moving average on top
                ax.plot(steps, values, **styles[method], alpha=0.3, linewidth=1)
                smooth = [
                    sum(values[max(0, i - SMOOTHING + 1) : i + 1]) / len(values[max(0, i - SMOOTHING + 1) : i + 1])
                    for i in range(len(values))
                ]
                ax.plot(steps, smooth, **styles[method], linewidth=2, label=f"{method.upper()} ({SMOOTHING}-step mean)")
            else:
                ax.plot(steps, values, **styles[method], linewidth=1.5, label=method.upper())
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_record(args: argparse.Namespace, seconds: dict[str, float]) -> dict:
    """What made the curves: settings, time, versions, machine, date, commit."""
    import datetime
    import importlib.metadata
    import os
    import platform
    import subprocess

    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None  # not a git checkout
    return {
        "command": " ".join(["python", "examples/learning_curve.py", *sys.argv[1:]]),
        "seed": args.seed,
        "max_steps": args.max_steps,
        "seconds": seconds,
        "resumed": args.resume,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
        "versions": {
            name: importlib.metadata.version(name) for name in ("torch", "transformers", "trl", "apo-kernels")
        },
        "git_commit": commit,
    }


def summary_lines(curves: dict[str, list[dict]], seconds: dict[str, float]) -> list[str]:
    out = ["== learning curves summary =="]
    for method, points in curves.items():
        r0, r1 = ends(points, "reward")
        e0, e1 = ends(points, "entropy")
        l0, l1 = ends(points, "completion_length")
        kl = points[-1].get("kl", math.nan)
        out.append(
            f"{method}: {len(points)} steps in {seconds[method]:.0f} s; reward {r0:.3f} -> {r1:.3f} (mean of the "
            f"first and last {SMOOTHING} steps); entropy {e0:.3f} -> {e1:.3f}; length {l0:.2f} -> {l1:.2f}; "
            f"KL at the last step {kl:.3g}"
        )
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--max-steps", type=int, default=MAX_STEPS, help=f"optimizer steps per run ({MAX_STEPS})")
    parser.add_argument("--save-steps", type=int, default=10, help="checkpoint every this many steps (10)")
    parser.add_argument("--seed", type=int, default=0, help="initial weights, data and sampling (0)")
    parser.add_argument("--resume", action="store_true", help="continue each run from its last checkpoint")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    args = parser.parse_args(argv)
    if args.max_steps < 1 or args.save_steps < 1:
        parser.error("--max-steps and --save-steps must be positive")

    print("loading TRL and transformers ...", file=sys.stderr, flush=True)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    processor = tiny.build_tiny_processor()
    curves, seconds = {}, {}
    for method in args.methods:
        start = time.perf_counter()
        curves[method] = train(
            method, args.output_dir, args.max_steps, args.save_steps, args.resume, args.seed, processor
        )
        seconds[method] = time.perf_counter() - start

    curves_path, plot_path = args.output_dir / "curves.json", args.output_dir / "curves.png"
    curves_path.write_text(json.dumps(curves, indent=1) + "\n")
    (args.output_dir / "run.json").write_text(json.dumps(run_record(args, seconds), indent=1) + "\n")
    plot(curves, plot_path, "tiny Qwen2.5-VL, 'what colour is the picture ?', 4 prompts x 8 responses per step (CPU)")
    lines = summary_lines(curves, seconds)
    lines.append(
        f"saved: {curves_path}, {plot_path}, run.json, checkpoints under "
        + ", ".join(str(args.output_dir / m) for m in args.methods)
    )
    failed = None
    if "apo" in curves and len(curves["apo"]) >= MAX_STEPS:
        first, last = ends(curves["apo"], "reward")
        if not last >= first + MIN_RISE:
            failed = f"APO's reward rose by {last - first:.3f} (< {MIN_RISE}) from its first to its last steps"
        lines.append("result: " + (f"FAILED: {failed}" if failed else f"OK (APO's reward rose by {last - first:.3f})"))
    else:
        lines.append(f"result: OK (the rise of APO's reward is checked on runs of {MAX_STEPS} steps or more)")
    print("\n".join(lines), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
