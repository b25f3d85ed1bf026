"""The sweep harness shared by ``memory.py`` and ``speed.py``: the cases, the command line, one worker process
per implementation, environment metadata and the results file.

A case is one pass (``fwd`` or ``fwd+bwd``, see ``impls.py``) of one implementation on one micro-batch of
``GROUP_SIZE`` responses of ``tokens / GROUP_SIZE`` tokens each, every token valid. The sweep runs the
largest token count first (the headline shape: a sweep cut short by a time limit loses the smallest), every
implementation at one count before the next. Each implementation has one worker process for all its cases
(a process start, a CUDA context and compilations cost seconds each, and GPU time is scarce); the passes of
one implementation and size run one after the other in it, on the same inputs, which it frees before the
next size. A worker reports each record as a ``RESULT_PREFIX`` line on its stdout.
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
import tempfile
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

import impls  # first: puts this checkout's apo_kernels on sys.path
import apo_kernels
from impls import REPO, Inputs, SkippedCase, Step

# The committed reference results (refreshed only by passing --out-dir benchmarks/results explicitly).
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Where a run writes by default: a folder in the current directory, git-ignored (.gitignore), so that a
# benchmark run leaves the checkout clean.
LOCAL_OUT_DIR = Path("benchmark-results")
# On a GPU machine lent through the device tool only what is written under $OUT comes back: there it is
# the default.
OUT_ENV = "OUT"

PASSES = ("fwd", "fwd+bwd")
# Model FLOPs per pass, in units of N D V (tokens x hidden x vocab): fwd is the logits GEMM; fwd+bwd the least
# a loss step needs, the logits GEMM and the d hidden and d weight GEMMs (one pass; two passes recompute the
# logits, 8 N D V). Every implementation is credited the same count, so TFLOP/s compare as inverse times.
FLOPS_PER_NDV = {"fwd": 2, "fwd+bwd": 6}

GROUP_SIZE = 8  # responses per micro-batch: one GRPO group, as in the paper
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Qwen2.5-VL-3B on GPU. On CPU the real vocabulary with a small hidden size, so that the reference's
# N x V float32 logits dominate its memory as they do on GPU, and the sweep ends in minutes on 2 cores.
# The implementations of each device's sweep are impls.default_impls(device).
DEFAULTS = {
    "cuda": dict(hidden=2048, vocab=151936, dtype="bfloat16", tokens=[4096, 16384, 32768], passes=list(PASSES)),
    "cpu": dict(hidden=256, vocab=151936, dtype="float32", tokens=[512, 1024, 2048, 4096], passes=["fwd+bwd"]),
}

WORKER_FLAG = "--worker"
RESULT_PREFIX = "BENCHMARK-RESULT "


# --- cases ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    impl: str
    pass_: str  # "fwd" or "fwd+bwd"; "pass" in records (a Python keyword here)
    device: str
    dtype: str
    tokens: int
    hidden: int
    vocab: int

    def record(self) -> dict:
        fields = dataclasses.asdict(self)
        return {"impl": fields.pop("impl"), "pass": fields.pop("pass_"), **fields}

    @classmethod
    def from_record(cls, record: dict) -> "Case":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {("pass_" if key == "pass" else key): value for key, value in record.items()}
        return cls(**{key: value for key, value in values.items() if key in names})


def model_flops(case: Case) -> int:
    return FLOPS_PER_NDV[case.pass_] * case.tokens * case.hidden * case.vocab


def flops_formula(pass_: str) -> str:
    return f"{FLOPS_PER_NDV[pass_]} N D V"


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    device = torch.device(case.device)
    dtype = DTYPES[case.dtype]
    # Drawn where they are used: on a GPU, drawing the 151936 x 2048 weight on the host would take seconds.
    gen = torch.Generator(device).manual_seed(seed)
    shape = (GROUP_SIZE, case.tokens // GROUP_SIZE)

    def randn(*size):
        return torch.randn(*size, generator=gen, device=device)

    def leaf(*size, scale):
        return (randn(*size) * scale).to(dtype).requires_grad_()

    # Unit-variance logits, so that log-probs sit near -log(V) as for an untrained head.
    uniform_logp = -math.log(case.vocab)
    return Inputs(
        hidden=leaf(*shape, case.hidden, scale=1.0),
        weight=leaf(case.vocab, case.hidden, scale=case.hidden**-0.5),
        targets=torch.randint(case.vocab, shape, generator=gen, device=device),
        mask=torch.ones(shape, dtype=torch.bool, device=device),
        advantages=randn(GROUP_SIZE),
        # Old and reference log-probs a little off the current ones, so ratios spread around 1 and get clipped.
        old_logps=uniform_logp + 0.3 * randn(*shape),
        ref_logps=uniform_logp + 0.3 * randn(*shape),
    )


def run_pass(step: Step, inputs: Inputs, case: Case) -> torch.Tensor:
    """One pass: the log-probs (fwd), or the loss after its backward (fwd+bwd); detached."""
    out = step(inputs)
    if case.pass_ == "fwd+bwd":
        out.backward()
    return out.detach()


# --- command line -----------------------------------------------------------------------------------------


def default_out_dir() -> Path:
    return Path(os.environ[OUT_ENV]) if os.environ.get(OUT_ENV) else LOCAL_OUT_DIR


def parse_sweep_args(
    description: str, argv: Optional[Sequence[str]] = None, cpu_tokens: Optional[list[int]] = None
) -> argparse.Namespace:
    """The options both scripts share; unset ones take the defaults of the device (``cpu_tokens`` replaces
    the cpu token counts)."""
    defaults = {device: {**values, "impls": impls.default_impls(device)} for device, values in DEFAULTS.items()}
    if cpu_tokens:
        defaults["cpu"]["tokens"] = cpu_tokens
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=sorted(DEFAULTS), help="default: cuda when available, else cpu")
    parser.add_argument("--hidden", type=int, help="hidden size D (default: 2048 on cuda, 256 on cpu)")
    parser.add_argument("--vocab", type=int, help="vocabulary size V (default: 151936)")
    parser.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        help=f"tokens per micro-batch, multiples of {GROUP_SIZE} (default: "
        + "; ".join(f"{d} {' '.join(map(str, v['tokens']))}" for d, v in defaults.items())
        + ")",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="of hidden and weight (default: bfloat16 on cuda, float32 on cpu)"
    )
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=list(impls.IMPLS),
        help="default: " + "; ".join(f"{d} {' '.join(v['impls'])}" for d, v in defaults.items()),
    )
    parser.add_argument(
        "--passes",
        nargs="+",
        choices=PASSES,
        help="fwd: log-probs under no_grad; fwd+bwd: loss step with backward (default: both on cuda, fwd+bwd on cpu)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=default_out_dir(),
        help=f"where results go, as <script>-<gpu name or cpu>-<date>.{{json,png}} (default: "
        f"${OUT_ENV} when set, else ./{LOCAL_OUT_DIR} in the current directory, git-ignored; the "
        "committed reference results are refreshed only with an explicit --out-dir benchmarks/results)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="results file (overrides --out-dir's name); rewritten after each "
        "case, so a sweep cut short still leaves its records",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        help="figure (default: the --json path with .png; with --replot, the replotted JSON's path with .png)",
    )
    parser.add_argument(
        "--list-cases",
        action="store_true",
        help="print the cases the options select and exit (runs nothing; needs no GPU)",
    )
    parser.add_argument(
        "--replot",
        type=Path,
        metavar="JSON",
        help="print the tables and draw the figure of a results file (e.g. a sweep cut short) and exit",
    )
    parser.add_argument(WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker or args.replot:
        return args
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available() and not args.list_cases:
        parser.error("--device cuda: CUDA is not available")
    for name, value in defaults[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    bad = [n for n in args.tokens if n <= 0 or n % GROUP_SIZE]
    if bad:
        parser.error(f"--tokens must be positive multiples of {GROUP_SIZE} (the group size), got {bad}")
    return args


def sweep_groups(args: argparse.Namespace) -> list[list[Case]]:
    """The cases of the sweep in the order they run, in groups measured on one set of inputs: one group per
    token count (the largest first) and implementation, its passes in :data:`PASSES` order."""
    groups = []
    for tokens in sorted(set(args.tokens), reverse=True):
        for impl in args.impls:
            fwd_same_as = impls.IMPLS[impl].fwd_same_as
            passes = [p for p in PASSES if p in args.passes and not (p == "fwd" and fwd_same_as)]
            if passes:
                groups.append([Case(impl, p, args.device, args.dtype, tokens, args.hidden, args.vocab) for p in passes])
    return groups


def output_paths(args: argparse.Namespace, script: str, device_tag: str) -> tuple[Path, Path]:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    json_path = args.json or args.out_dir / f"{script}-{device_tag}-{stamp}.json"
    return json_path, args.plot or json_path.with_suffix(".png")


# --- one worker process per implementation and size ---------------------------------------------------------


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


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"


def _measure_group(
    cases: Sequence[Case], measure: Callable[[Step, Inputs, Case], dict], metrics: Sequence[str]
) -> None:
    """Measure each case (the passes of one implementation and size) on one set of inputs, and print each
    record as a line as soon as it is known."""
    inputs = None
    for case in cases:
        record = {**case.record(), **dict.fromkeys(metrics), "status": "ok", "note": None}
        try:
            step = impls.build_step(case.impl, case.pass_, case.device)
            if inputs is None:
                inputs = make_inputs(case)
            inputs.clear_grads()
            record.update(measure(step, inputs, case))
        except SkippedCase as exc:
            record.update(status="skipped", note=str(exc))
        except Exception as exc:  # noqa: BLE001  (a result, so that one failing case cannot end the sweep)
            if not _is_out_of_memory(exc):
                traceback.print_exc()
            record.update(
                {name: None for name in metrics},
                note=_first_line(exc),
                status="oom" if _is_out_of_memory(exc) else "error",
            )
        if case.device == "cuda":
            torch.cuda.empty_cache()
        print(RESULT_PREFIX + json.dumps(record), flush=True)


def run_worker(measure: Callable[[Step, Inputs, Case], dict], metrics: Sequence[str]) -> None:
    """Child side: measure each group of cases read from stdin (a JSON list of case records a line) until
    stdin closes; each group's inputs are freed before the next."""
    capped = False
    for line in sys.stdin:
        cases = [Case.from_record(record) for record in json.loads(line)]
        if cases[0].device == "cpu" and not capped:
            _cap_address_space()
            capped = True
        _measure_group(cases, measure, metrics)
        if cases[0].device == "cuda":
            torch.cuda.empty_cache()  # the group's inputs are gone: their memory goes back to the other workers


class _Worker:
    """Parent side of one worker process (``script --worker``), which measures the groups it is sent."""

    def __init__(self, script: Path):
        # stderr into a file, not a pipe: a pipe nobody reads while the worker measures could fill and stall it
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, str(script), WORKER_FLAG],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            bufsize=1,
        )

    def run(self, cases: Sequence[Case]) -> Iterator[dict]:
        """The records of ``cases`` as the worker reports them; fewer if it dies first."""
        try:
            self.proc.stdin.write(json.dumps([case.record() for case in cases]) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return
        reported = 0
        while reported < len(cases):
            line = self.proc.stdout.readline()
            if not line:
                return
            if line.startswith(RESULT_PREFIX):
                reported += 1
                yield json.loads(line[len(RESULT_PREFIX) :])

    def stderr_size(self) -> int:
        return os.fstat(self.stderr.fileno()).st_size

    def stderr_since(self, offset: int) -> str:
        """What the worker wrote to stderr from byte ``offset`` on (read without moving the file's offset,
        which the worker shares)."""
        return os.pread(self.stderr.fileno(), self.stderr_size() - offset, offset).decode(errors="replace")

    def close(self) -> int:
        """Close its stdin (it ends after its current group) and wait for it; its exit code."""
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        returncode = self.proc.wait()
        self.stderr.close()
        return returncode


def run_groups(script: Path, groups: Sequence[Sequence[Case]], metrics: Sequence[str]) -> Iterator[dict]:
    """Parent side: the records of ``groups``, in order, each as soon as it is measured. One worker process
    per implementation serves all its groups; the cases a worker did not report (it crashed or was killed)
    come back as ``error``, and the implementation's next group gets a fresh worker."""
    workers: dict[str, _Worker] = {}
    try:
        for cases in groups:
            impl = cases[0].impl
            if impl not in workers:
                workers[impl] = _Worker(script)
            worker = workers[impl]
            stderr_start = worker.stderr_size()
            reported = []
            for record in worker.run(cases):
                reported.append(record)
                yield record
            lost = cases[len(reported) :]
            returncode = worker.proc.wait() if lost else None  # it closed its stdout: it is ending
            if lost or any(r["status"] == "error" for r in reported):
                print(worker.stderr_since(stderr_start)[-4000:], file=sys.stderr, flush=True)
            if lost:
                workers.pop(impl).close()
                note = f"worker exited with code {returncode} (-9 is a kill, e.g. by the OOM killer) before reporting"
                for case in lost:
                    yield {**case.record(), **dict.fromkeys(metrics), "status": "error", "note": note}
    finally:
        for worker in workers.values():
            worker.close()


# --- environment and git metadata ----------------------------------------------------------------------------


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _commit() -> dict:
    """The measured commit, and whether the measured code differs from it. From git in a checkout; in a copy
    of the tree without git (as a GPU machine gets it) from ``APO_COMMIT`` (``<sha>`` or ``<sha>+dirty``),
    which ``gpu_suite.sh`` sets from what its ``--prepare`` step recorded."""
    toplevel = _git("rev-parse", "--show-toplevel")
    if toplevel and Path(toplevel).resolve() == REPO:  # not a git repository that merely holds this copy
        # Uncommitted changes to the measured code make the commit an approximation (results do not count).
        dirty = _git("status", "--porcelain", "--", "apo_kernels", "benchmarks", ":!benchmarks/results")
        return {"git_commit": _git("rev-parse", "HEAD"), "git_dirty": bool(dirty), "git_commit_source": "git"}
    named = os.environ.get("APO_COMMIT")
    if named:
        sha, _, state = named.partition("+")
        return {"git_commit": sha, "git_dirty": state == "dirty", "git_commit_source": "APO_COMMIT"}
    return {"git_commit": None, "git_dirty": None, "git_commit_source": None}


def commit_label() -> str:
    """This checkout's commit as ``APO_COMMIT`` spells it, for ``gpu_suite.sh --prepare`` to record."""
    commit = _commit()
    if commit["git_commit_source"] != "git":
        raise SystemExit(f"{REPO} is not a git checkout: no commit to record")
    return commit["git_commit"] + ("+dirty" if commit["git_dirty"] else "")


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        if found:
            return found.group(1).strip()
    return platform.processor() or platform.machine()


def _gpu_properties() -> dict:
    """GPU 0's name and memory, read in a child process: the sweep's parent holds no CUDA context of its own
    beside the workers it measures."""
    code = (
        "import json, torch; p = torch.cuda.get_device_properties(0); "
        "print(json.dumps(dict(gpu=p.name, gpu_memory_bytes=p.total_memory, cuda=torch.version.cuda)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def environment(device: str) -> dict:
    """Where and with what the results are measured."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **_commit(),
        "versions": {
            **{name: _version(name) for name in ("torch", "triton", "numpy", "liger-kernel", "trl", "transformers")},
            "apo-kernels": apo_kernels.__version__,  # also when imported from the source tree, not installed
        },
    }
    if device == "cuda":
        env.update(_gpu_properties())
    return env


def device_tag(env: dict) -> str:
    """``cpu`` or a slug of the GPU name, for file names."""
    return re.sub(r"[^a-z0-9]+", "-", env["gpu"].lower()).strip("-") if "gpu" in env else "cpu"


# --- the results file ---------------------------------------------------------------------------------------


def sweep_settings(args: argparse.Namespace) -> dict:
    return {
        "group_size": GROUP_SIZE,
        "beta": impls.BETA,
        "clip_eps": impls.CLIP_EPS,
        "loss": "GRPO + k3 KL, token-mean (bnpo)",
        "hidden": args.hidden,
        "vocab": args.vocab,
        "dtype": args.dtype,
        "tokens": sorted(args.tokens),
        "impls": args.impls,
        "passes": args.passes,
        "flops_per_pass": {p: flops_formula(p) for p in args.passes},
    }


def write_results(path: Path, env: dict, settings: dict, records: list[dict], complete: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    results = {"environment": env, "settings": settings, "complete": complete, "records": records}
    path.write_text(json.dumps(results, indent=1) + "\n")
