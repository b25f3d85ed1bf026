"""What ``memory.py`` and ``speed.py`` share: the sweep's command line, the loss step of each implementation,
the one-case-per-subprocess runner, environment metadata, the table and the plot.

Every implementation computes the same loss, GRPO with a KL loss (APO with DADS and STCR off):
log-probs of the sampled tokens from ``hidden @ weight.T`` (temperature 1), the clipped policy term against
``old_logps`` with per-sequence advantages, the k3 KL against ``ref_logps`` weighted by ``BETA``, both
averaged over all tokens of the micro-batch (TRL/Liger ``loss_type="bnpo"``, verl ``token-mean``). A case is
one micro-batch of ``GROUP_SIZE`` responses of ``tokens / GROUP_SIZE`` tokens each, every token valid, and
``hidden`` and ``weight`` both require gradients (the LM head is trained, as with tied embeddings).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from apo_kernels import APOConfig, apo_loss, reference

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

IMPLS = ("reference", "apo_kernels", "apo_kernels-torch", "liger", "trl")
GROUP_SIZE = 8  # responses per micro-batch: one GRPO group, as in the paper
BETA = 0.04  # TRL's and Liger's default KL coefficient
CLIP_EPS = 0.2
APO_CONFIG = APOConfig(
    beta=BETA, eps_low=CLIP_EPS, eps_high=CLIP_EPS, loss_agg_mode="token-mean", kl_agg_mode="token-mean",
    dads=False, stcr=False,
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Qwen2.5-VL-3B on GPU. On CPU the real vocabulary with a small hidden size, so that the reference's
# N x V float32 logits dominate its memory as they do on GPU, and the sweep ends in minutes on 2 cores.
DEFAULTS = {
    "cuda": dict(hidden=2048, vocab=151936, dtype="bfloat16", tokens=[1024 << i for i in range(7)], impls=list(IMPLS)),
    "cpu": dict(
        hidden=256, vocab=151936, dtype="float32", tokens=[512, 1024, 2048, 4096],
        impls=["reference", "apo_kernels", "liger", "trl"],
    ),
}

WORKER_FLAG = "--worker"
RESULT_PREFIX = "BENCHMARK-RESULT "


@dataclass(frozen=True)
class Case:
    impl: str
    device: str
    dtype: str
    tokens: int
    hidden: int
    vocab: int


@dataclass
class Inputs:
    hidden: torch.Tensor  # (B, T, D), requires grad
    weight: torch.Tensor  # (V, D), requires grad
    targets: torch.Tensor  # (B, T) int64
    mask: torch.Tensor  # (B, T) bool, all True
    advantages: torch.Tensor  # (B,) float32
    old_logps: torch.Tensor  # (B, T) float32
    ref_logps: torch.Tensor  # (B, T) float32

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def grads_nbytes(self) -> int:
        return sum(t.grad.nbytes for t in (self.hidden, self.weight) if t.grad is not None)

    def clear_grads(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    dtype, device = DTYPES[case.dtype], torch.device(case.device)
    seq_len = case.tokens // GROUP_SIZE
    shape = (GROUP_SIZE, seq_len)

    def leaf(*size, scale):
        return (torch.randn(*size, generator=gen) * scale).to(device, dtype).requires_grad_()

    # Unit-variance logits, so that log-probs sit near -log(V) as for an untrained head.
    uniform_logp = -math.log(case.vocab)
    return Inputs(
        hidden=leaf(*shape, case.hidden, scale=1.0),
        weight=leaf(case.vocab, case.hidden, scale=case.hidden**-0.5),
        targets=torch.randint(case.vocab, shape, generator=gen).to(device),
        mask=torch.ones(shape, dtype=torch.bool, device=device),
        advantages=torch.randn(GROUP_SIZE, generator=gen).to(device),
        # Old and reference log-probs a little off the current ones, so ratios spread around 1 and get clipped.
        old_logps=(uniform_logp + 0.3 * torch.randn(shape, generator=gen)).to(device),
        ref_logps=(uniform_logp + 0.3 * torch.randn(shape, generator=gen)).to(device),
    )


class SkippedCase(Exception):
    """The implementation cannot run here (package missing or too old)."""


Step = Callable[[Inputs], torch.Tensor]


def _apo_step(backend: str) -> Step:
    def step(x: Inputs) -> torch.Tensor:
        return apo_loss(
            x.hidden, x.weight, x.targets, x.mask, x.advantages, old_logps=x.old_logps, ref_logps=x.ref_logps,
            config=APO_CONFIG, backend=backend,
        ).loss

    return step


def _reference_step(x: Inputs) -> torch.Tensor:
    return reference.apo_loss(
        x.hidden, x.weight, x.targets, x.mask, x.advantages, old_logps=x.old_logps, ref_logps=x.ref_logps,
        config=APO_CONFIG,
    ).loss


def _liger_step(device: str) -> Step:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as exc:
        raise SkippedCase(f"liger-kernel is not installed ({exc})") from exc
    # torch.compile of the loss math is Liger's default, on GPU; it has no CPU backend worth using here.
    loss_fn = LigerFusedLinearGRPOLoss(
        beta=BETA, compiled=device == "cuda", use_ref_model=True, epsilon_low=CLIP_EPS, epsilon_high=CLIP_EPS,
        loss_type="bnpo", temperature=1.0,
    )

    def step(x: Inputs) -> torch.Tensor:
        loss, _metrics = loss_fn(
            x.hidden, x.weight, x.targets, x.mask, x.advantages, ref_per_token_logps=x.ref_logps,
            old_per_token_logps=x.old_logps,
        )
        return loss

    return step


def _trl_step() -> Step:
    try:
        import trl
        from packaging.version import Version
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as vocab_chunk  # what GRPOTrainer passes
    except ImportError as exc:
        raise SkippedCase(f"trl >= 1.15 is not installed ({exc})") from exc
    if Version(trl.__version__) < Version("1.15"):
        raise SkippedCase(f"trl {trl.__version__} < 1.15 has no ChunkedLogProbFunction")

    def step(x: Inputs) -> torch.Tensor:
        batch, seq_len, hidden = x.hidden.shape
        # Log-probs and entropies, as GRPOTrainer's fused LM head requests them.
        logps, _entropy, *_ = ChunkedLogProbFunction.apply(
            x.hidden.reshape(-1, hidden), x.weight, None, x.targets.reshape(-1), 1.0, vocab_chunk, None, 1.0,
            ("entropy",),
        )
        logps = logps.view(batch, seq_len)
        # GRPOTrainer._compute_loss (trl 1.16) for loss_type="bnpo" with token-level importance sampling,
        # written out here because TRL only has it as a trainer method.
        coef_1 = torch.exp(logps - x.old_logps)
        coef_2 = torch.clamp(coef_1, 1 - CLIP_EPS, 1 + CLIP_EPS)
        advantages = x.advantages.unsqueeze(1)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
        per_token_kl = torch.exp(x.ref_logps - logps) - (x.ref_logps - logps) - 1
        per_token_loss = per_token_loss + BETA * per_token_kl
        mask = x.mask.float()
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)

    return step


def build_step(case: Case) -> Step:
    """The loss function of ``case.impl``; raises :class:`SkippedCase` when it cannot run here."""
    if case.impl == "reference":
        return _reference_step
    if case.impl == "apo_kernels":
        return _apo_step("auto")
    if case.impl == "apo_kernels-torch":
        return _apo_step("torch")
    if case.impl == "liger":
        return _liger_step(case.device)
    if case.impl == "trl":
        return _trl_step()
    raise ValueError(f"unknown implementation {case.impl!r}")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --- command line -----------------------------------------------------------------------------------------


def parse_sweep_args(
    description: str, argv: Optional[Sequence[str]] = None, cpu_tokens: Optional[list[int]] = None
) -> argparse.Namespace:
    """The options both scripts share; unset ones take the defaults of the device (``cpu_tokens`` replaces
    the cpu token counts)."""
    defaults = {**DEFAULTS, "cpu": {**DEFAULTS["cpu"], **({"tokens": cpu_tokens} if cpu_tokens else {})}}
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=sorted(DEFAULTS), help="default: cuda when available, else cpu")
    parser.add_argument("--hidden", type=int, help="hidden size D (default: 2048 on cuda, 256 on cpu)")
    parser.add_argument("--vocab", type=int, help="vocabulary size V (default: 151936)")
    parser.add_argument(
        "--tokens", type=int, nargs="+", help=f"tokens per micro-batch, multiples of {GROUP_SIZE} (default: "
        + ", ".join(f"{d} {min(v['tokens'])}..{max(v['tokens'])}" for d, v in defaults.items()) + ")",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="of hidden and weight (default: bfloat16 on cuda, "
                        "float32 on cpu)")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, help="default: all on cuda; on cpu all but "
                        "apo_kernels-torch, which is what apo_kernels runs there")
    parser.add_argument("--json", type=Path, help="results file (default: benchmarks/results/<script>-<device>-<date>.json)")
    parser.add_argument("--plot", type=Path, help="figure (default: the --json path with .png)")
    parser.add_argument(WORKER_FLAG, metavar="CASE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    for name, value in defaults[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    bad = [n for n in args.tokens if n <= 0 or n % GROUP_SIZE]
    if bad:
        parser.error(f"--tokens must be positive multiples of {GROUP_SIZE} (the group size), got {bad}")
    return args


def sweep_cases(args: argparse.Namespace) -> list[Case]:
    return [
        Case(impl, args.device, args.dtype, tokens, args.hidden, args.vocab)
        for tokens in sorted(args.tokens)
        for impl in args.impls
    ]


def output_paths(args: argparse.Namespace, script: str, device_tag: str) -> tuple[Path, Path]:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    json_path = args.json or RESULTS_DIR / f"{script}-{device_tag}-{stamp}.json"
    return json_path, args.plot or json_path.with_suffix(".png")


# --- one case per subprocess --------------------------------------------------------------------------------


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def _cap_address_space() -> None:
    """Make a CPU allocation beyond the memory available now fail in the allocator (reported as ``oom``)
    instead of waking the kernel's OOM killer, which could pick another process."""
    meminfo = Path("/proc/meminfo")
    status = Path("/proc/self/status")
    if not (meminfo.exists() and status.exists()):
        return
    available_kib = int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo.read_text()).group(1))
    mapped_kib = int(re.search(r"VmSize:\s+(\d+) kB", status.read_text()).group(1))
    limit = (mapped_kib + available_kib) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def run_worker(case_json: str, measure: Callable[[Step, Inputs, Case], dict], metrics: Sequence[str]) -> None:
    """Child side: measure one case and print its record as the last stdout line."""
    case = Case(**json.loads(case_json))
    if case.device == "cpu":
        _cap_address_space()
    record = {**dataclasses.asdict(case), **dict.fromkeys(metrics), "status": "ok", "note": None}
    try:
        step = build_step(case)
        record.update(measure(step, make_inputs(case), case))
    except SkippedCase as exc:
        record.update(status="skipped", note=str(exc))
    except Exception as exc:  # noqa: BLE001  (only out-of-memory errors are results; the rest re-raise)
        if not _is_out_of_memory(exc):
            raise
        record.update({name: None for name in metrics}, status="oom", note=str(exc).splitlines()[0][:200])
    print(RESULT_PREFIX + json.dumps(record), flush=True)


def run_case(script: Path, case: Case) -> dict:
    """Parent side: run ``script --worker CASE`` in a fresh interpreter and return its record."""
    proc = subprocess.run(
        [sys.executable, str(script), WORKER_FLAG, json.dumps(dataclasses.asdict(case))],
        capture_output=True, text=True,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1][len(RESULT_PREFIX):])
    raise RuntimeError(
        f"{script.name} failed on {case} (exit code {proc.returncode}; -9 is a kill, e.g. by the OOM killer):\n"
        + proc.stderr[-4000:]
    )


def run_sweep(script: Path, cases: Sequence[Case], describe: Callable[[dict], str]) -> list[dict]:
    records = []
    for i, case in enumerate(cases, 1):
        record = run_case(script, case)
        print(f"[{i}/{len(cases)}] {case.impl:<17} tokens={case.tokens:<6} {describe(record)}", flush=True)
        records.append(record)
    return records


# --- metadata, results file, table, plot --------------------------------------------------------------------


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        if found:
            return found.group(1).strip()
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    """Where and with what the results were measured. Call it after the sweep: on cuda it opens a context."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git("rev-parse", "HEAD"),
        # Uncommitted changes to the measured code make the commit an approximation (results do not count).
        "git_dirty": bool(_git("status", "--porcelain", "--", "apo_kernels", "benchmarks", ":!benchmarks/results")),
        "versions": {
            name: _version(name)
            for name in ("torch", "triton", "liger-kernel", "trl", "transformers", "apo-kernels")
        },
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return env


def device_tag(env: dict) -> str:
    """``cpu`` or a slug of the GPU name, for file names."""
    return re.sub(r"[^a-z0-9]+", "-", env["gpu"].lower()).strip("-") if "gpu" in env else "cpu"


def write_results(path: Path, env: dict, args: argparse.Namespace, records: list[dict]) -> None:
    settings = {
        "group_size": GROUP_SIZE, "beta": BETA, "clip_eps": CLIP_EPS, "loss": "GRPO + k3 KL, token-mean (bnpo)",
        "hidden": args.hidden, "vocab": args.vocab, "dtype": args.dtype, "tokens": sorted(args.tokens),
        "impls": args.impls,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": env, "settings": settings, "records": records}, indent=1) + "\n")


def measured_where(env: dict) -> str:
    where = env.get("gpu") or f"{env['cpu']} ({env['torch_threads']} threads)"
    commit = (env["git_commit"] or "unknown")[:7] + ("+dirty" if env["git_dirty"] else "")
    return f"{where}, torch {env['versions']['torch']}, commit {commit}, {env['date'][:10]}"


def format_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def markdown_table(records: list[dict], cell: Callable[[dict], str]) -> str:
    """One row per token count, one column per implementation; non-ok cells show the status."""
    impls = list(dict.fromkeys(r["impl"] for r in records))
    by_key = {(r["tokens"], r["impl"]): r for r in records}
    rows = ["| tokens | " + " | ".join(impls) + " |", "|---:|" + "---:|" * len(impls)]
    for tokens in sorted({r["tokens"] for r in records}):
        cells = []
        for impl in impls:
            record = by_key.get((tokens, impl))
            cells.append("" if record is None else cell(record) if record["status"] == "ok" else record["status"])
        rows.append(f"| {tokens} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(
    records: list[dict], panels: Sequence[tuple[str, str, Callable[[float], float], bool]], title: str, path: Path
) -> None:
    """One panel per ``(field, y label, scale function, log y)``: the field against tokens (log x), a line per
    implementation, ``ok`` records only (the table says which cases ran out of memory or were skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    impls = list(dict.fromkeys(r["impl"] for r in records))
    tokens = sorted({r["tokens"] for r in records})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (field, label, scale, log_y) in zip(axes[0], panels):
        for impl in impls:
            points = sorted((r["tokens"], scale(r[field])) for r in records if r["impl"] == impl and r["status"] == "ok")
            if points:
                ax.plot(*zip(*points), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xticks(tokens, [str(n) for n in tokens])
        ax.xaxis.set_minor_formatter(NullFormatter())
        if log_y:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("tokens per micro-batch")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass(frozen=True)
class Script:
    """What distinguishes ``memory.py`` from ``speed.py``; :func:`run_script` does the rest."""

    name: str  # prefix of the result files
    path: Path  # the script, re-run as each case's worker
    description: str
    title: str  # what one step measures, for the table and the figure
    cells: str  # what a table cell shows
    measure: Callable[[Step, Inputs, Case], dict]
    metrics: Sequence[str]
    describe: Callable[[dict], str]  # one progress line per case
    cell: Callable[[dict], str]
    panels: list  # plot panels: (metric, label, scale, log)
    summary: Optional[Callable[[list[dict]], str]] = None
    cpu_tokens: Optional[list[int]] = None


def run_script(script: Script) -> None:
    """Worker mode (one case, in a fresh process), or the whole sweep: table, JSON and plot."""
    args = parse_sweep_args(script.description, cpu_tokens=script.cpu_tokens)
    if args.worker:
        run_worker(args.worker, script.measure, script.metrics)
        return
    print(f"{script.name}: {args.device} {args.dtype}, hidden {args.hidden}, vocab {args.vocab}, "
          f"tokens {sorted(args.tokens)}")
    records = run_sweep(script.path, sweep_cases(args), script.describe)
    env = environment(args.device)
    json_path, plot_path = output_paths(args, script.name, device_tag(env))
    where = measured_where(env)
    title = f"{script.title}: {args.dtype}, D={args.hidden}, V={args.vocab}"
    print(f"\n{title}\nMeasured on {where}. Cells: {script.cells}.\n")
    print(markdown_table(records, script.cell))
    if script.summary is not None:
        print("\n" + script.summary(records))
    write_results(json_path, env, args, records)
    plot(records, script.panels, f"{title}\n{where}", plot_path)
    print(f"\nwrote {json_path} and {plot_path}")
