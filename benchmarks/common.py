"""What ``memory.py`` and ``speed.py`` share: the sweep's command line, the two passes of each implementation,
the runner (one worker process per implementation), environment metadata, the table and the plot.

Two passes are measured (``--passes``):

- ``fwd``: the log-probs (and, where the implementation can, entropies) of the sampled tokens under
  ``torch.no_grad``: the old-policy / reference log-prob pass of every RL step.
- ``fwd+bwd``: one loss step, forward and backward. Every implementation computes the same loss, GRPO with a
  KL loss (APO with DADS and STCR off): log-probs of the sampled tokens from ``hidden @ weight.T``
  (temperature 1), the clipped policy term against ``old_logps`` with per-sequence advantages, the k3 KL
  against ``ref_logps`` weighted by ``BETA``, both averaged over all tokens of the micro-batch (TRL/Liger
  ``loss_type="bnpo"``, verl ``token-mean``); ``hidden`` and ``weight`` both get gradients (the LM head is
  trained, as with tied embeddings).

A case is one pass of one implementation on one micro-batch of ``GROUP_SIZE`` responses of
``tokens / GROUP_SIZE`` tokens each, every token valid. The sweep runs the largest token count first (the
headline shape: a sweep cut short by a time limit loses the smallest), every implementation at one count
before the next. Each implementation has one worker process for all its cases (a process start, a CUDA
context and compilations cost seconds each, and GPU time is scarce); the passes of one implementation and
size run one after the other in it, on the same inputs, which it frees before the next size.
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

REPO = Path(__file__).resolve().parent.parent
# The checkout's apo_kernels, also when the script runs from another directory and the package is not
# installed (sys.path[0] is this folder, not the repository): the measured code is the commit recorded.
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

import apo_kernels  # noqa: E402
from apo_kernels import APOConfig, apo_loss, fused_linear_logprobs, reference  # noqa: E402

# The committed reference results (refreshed only by passing --out-dir benchmarks/results explicitly).
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Where a run writes by default: a folder in the current directory, git-ignored (.gitignore), so that a
# benchmark run leaves the checkout clean.
LOCAL_OUT_DIR = Path("benchmark-results")
# On a GPU machine lent through the device tool only what is written under $OUT comes back: there it is
# the default.
OUT_ENV = "OUT"

IMPLS = ("reference", "apo_kernels", "apo_kernels-two-pass", "apo_kernels-torch", "apo_kernels-logprobs", "liger", "trl")
# An implementation whose fwd pass is the same call as another's is not measured twice.
FWD_SAME_AS = {"apo_kernels-logprobs": "apo_kernels", "apo_kernels-two-pass": "apo_kernels"}
PASSES = ("fwd", "fwd+bwd")
PASS_TITLES = {
    "fwd": "forward only under no_grad (log-probs of the sampled tokens, as for old/ref log-probs)",
    "fwd+bwd": "loss step, forward + backward into hidden and weight",
}
# Model FLOPs per pass, in units of N D V (tokens x hidden x vocab): fwd is the logits GEMM; fwd+bwd the least
# a loss step needs, the logits GEMM and the d hidden and d weight GEMMs (one pass; two passes recompute the
# logits, 8 N D V). Every implementation is credited the same count, so TFLOP/s compare as inverse times.
FLOPS_PER_NDV = {"fwd": 2, "fwd+bwd": 6}

GROUP_SIZE = 8  # responses per micro-batch: one GRPO group, as in the paper
BETA = 0.04  # TRL's and Liger's default KL coefficient
CLIP_EPS = 0.2
APO_CONFIG = APOConfig(
    beta=BETA, eps_low=CLIP_EPS, eps_high=CLIP_EPS, loss_agg_mode="token-mean", kl_agg_mode="token-mean",
    dads=False, stcr=False,
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# trl 1.16's trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE, the vocabulary tile GRPOTrainer passes. Not imported
# from there: trl.trainer takes seconds to import, which a fwd-only worker would pay for one constant (a test
# checks the value against trl's source).
TRL_VOCAB_CHUNK = 32768

# Qwen2.5-VL-3B on GPU. On CPU the real vocabulary with a small hidden size, so that the reference's
# N x V float32 logits dominate its memory as they do on GPU, and the sweep ends in minutes on 2 cores.
DEFAULTS = {
    "cuda": dict(
        hidden=2048, vocab=151936, dtype="bfloat16", tokens=[4096, 16384, 32768], impls=list(IMPLS),
        passes=list(PASSES),
    ),
    "cpu": dict(
        hidden=256, vocab=151936, dtype="float32", tokens=[512, 1024, 2048, 4096],
        impls=["reference", "apo_kernels", "apo_kernels-two-pass", "liger", "trl"], passes=["fwd+bwd"],
    ),
}

WORKER_FLAG = "--worker"
RESULT_PREFIX = "BENCHMARK-RESULT "


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


class SkippedCase(Exception):
    """The implementation cannot run here (package missing or too old)."""


# fwd: returns the (B, T) log-probs, gradients off; fwd+bwd: returns the scalar loss.
Step = Callable[[Inputs], torch.Tensor]


# --- log-probs (the fwd pass, and the start of the loss of TRL and apo_kernels-logprobs) -----------------


def _reference_logprobs(x: Inputs) -> torch.Tensor:
    return reference.linear_logprobs(x.hidden, x.weight, x.targets, return_entropy=True)[0]


def _apo_logprobs(backend: str) -> Step:
    def logprobs(x: Inputs) -> torch.Tensor:
        return fused_linear_logprobs(x.hidden, x.weight, x.targets, return_entropy=True, backend=backend)[0]

    return logprobs


def _trl_logprobs() -> Step:
    try:
        import trl
        from packaging.version import Version
        from trl.kernels import ChunkedLogProbFunction
    except ImportError as exc:
        raise SkippedCase(f"trl is not installed: pip install -e '.[trl]' (trl 1.16) ({exc})") from exc
    if Version(trl.__version__) < Version("1.15"):
        raise SkippedCase(f"trl {trl.__version__} < 1.15 has no ChunkedLogProbFunction")

    def logprobs(x: Inputs) -> torch.Tensor:
        batch, seq_len, hidden = x.hidden.shape
        # Log-probs and entropies, as GRPOTrainer's fused LM head requests them.
        logps, _entropy, *_ = ChunkedLogProbFunction.apply(
            x.hidden.reshape(-1, hidden), x.weight, None, x.targets.reshape(-1), 1.0, TRL_VOCAB_CHUNK, None, 1.0,
            ("entropy",),
        )
        return logps.view(batch, seq_len)

    return logprobs


def _liger_logprobs() -> Step:
    # Liger has no log-prob entry point of its own; this is the chunked selective log-softmax its GRPO loss
    # runs (under no_grad for reference log-probs). It returns no entropy.
    try:
        from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase
    except ImportError as exc:
        raise SkippedCase(f"liger-kernel is not installed ({exc})") from exc
    if not hasattr(LigerFusedLinearPPOBase, "chunk_forward"):
        raise SkippedCase("this liger-kernel has no LigerFusedLinearPPOBase.chunk_forward")
    return lambda x: LigerFusedLinearPPOBase.chunk_forward(x.hidden, x.weight, x.targets)


def _logprobs_step(impl: str) -> Step:
    if impl == "reference":
        return _reference_logprobs
    if impl == "apo_kernels":
        return _apo_logprobs("auto")
    if impl == "apo_kernels-torch":
        return _apo_logprobs("torch")
    if impl == "liger":
        return _liger_logprobs()
    if impl == "trl":
        return _trl_logprobs()
    raise ValueError(f"implementation {impl!r} has no fwd pass of its own")


# --- losses (the fwd+bwd pass) ------------------------------------------------------------------------------


def _apo_loss(backend: str, sweep: str = "auto") -> Step:
    def step(x: Inputs) -> torch.Tensor:
        return apo_loss(
            x.hidden, x.weight, x.targets, x.mask, x.advantages, old_logps=x.old_logps, ref_logps=x.ref_logps,
            config=APO_CONFIG, backend=backend, sweep=sweep,
        ).loss

    return step


def _reference_loss(x: Inputs) -> torch.Tensor:
    return reference.apo_loss(
        x.hidden, x.weight, x.targets, x.mask, x.advantages, old_logps=x.old_logps, ref_logps=x.ref_logps,
        config=APO_CONFIG,
    ).loss


def _loss_from_logprobs(logprobs: Step) -> Step:
    """The loss written in torch on top of a log-prob function, as a trainer that only takes log-probs from a
    kernel does: GRPOTrainer._compute_loss (trl 1.16) for loss_type="bnpo" with token-level importance
    sampling."""

    def step(x: Inputs) -> torch.Tensor:
        logps = logprobs(x)
        coef_1 = torch.exp(logps - x.old_logps)
        coef_2 = torch.clamp(coef_1, 1 - CLIP_EPS, 1 + CLIP_EPS)
        advantages = x.advantages.unsqueeze(1)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
        per_token_kl = torch.exp(x.ref_logps - logps) - (x.ref_logps - logps) - 1
        per_token_loss = per_token_loss + BETA * per_token_kl
        mask = x.mask.float()
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)

    return step


def _liger_loss(device: str) -> Step:
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


def _loss_step(case: Case) -> Step:
    if case.impl == "reference":
        return _reference_loss
    if case.impl == "apo_kernels":
        return _apo_loss("auto")
    if case.impl == "apo_kernels-two-pass":
        return _apo_loss("auto", sweep="two-pass")
    if case.impl == "apo_kernels-torch":
        return _apo_loss("torch")
    if case.impl == "apo_kernels-logprobs":
        return _loss_from_logprobs(_apo_logprobs("auto"))
    if case.impl == "liger":
        return _liger_loss(case.device)
    if case.impl == "trl":
        return _loss_from_logprobs(_trl_logprobs())
    raise ValueError(f"unknown implementation {case.impl!r}")


def build_step(case: Case) -> Step:
    """What ``case`` runs (see :data:`Step`); raises :class:`SkippedCase` when it cannot run here."""
    if case.pass_ == "fwd":
        return torch.no_grad()(_logprobs_step(case.impl))
    return _loss_step(case)


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
    defaults = {**DEFAULTS, "cpu": {**DEFAULTS["cpu"], **({"tokens": cpu_tokens} if cpu_tokens else {})}}
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=sorted(DEFAULTS), help="default: cuda when available, else cpu")
    parser.add_argument("--hidden", type=int, help="hidden size D (default: 2048 on cuda, 256 on cpu)")
    parser.add_argument("--vocab", type=int, help="vocabulary size V (default: 151936)")
    parser.add_argument(
        "--tokens", type=int, nargs="+", help=f"tokens per micro-batch, multiples of {GROUP_SIZE} (default: "
        + "; ".join(f"{d} {' '.join(map(str, v['tokens']))}" for d, v in defaults.items()) + ")",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="of hidden and weight (default: bfloat16 on cuda, "
                        "float32 on cpu)")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, help="default: all on cuda; on cpu reference, "
                        "apo_kernels (the torch backend there), liger, trl")
    parser.add_argument("--passes", nargs="+", choices=PASSES, help="fwd: log-probs under no_grad; fwd+bwd: "
                        "loss step with backward (default: both on cuda, fwd+bwd on cpu)")
    parser.add_argument("--out-dir", type=Path, default=default_out_dir(),
                        help=f"where results go, as <script>-<gpu name or cpu>-<date>.{{json,png}} (default: "
                        f"${OUT_ENV} when set, else ./{LOCAL_OUT_DIR} in the current directory, git-ignored; the "
                        "committed reference results are refreshed only with an explicit --out-dir benchmarks/results)")
    parser.add_argument("--json", type=Path, help="results file (overrides --out-dir's name); rewritten after each "
                        "case, so a sweep cut short still leaves its records")
    parser.add_argument("--plot", type=Path, help="figure (default: the --json path with .png; with --replot, the "
                        "replotted JSON's path with .png)")
    parser.add_argument("--list-cases", action="store_true",
                        help="print the cases the options select and exit (runs nothing; needs no GPU)")
    parser.add_argument("--replot", type=Path, metavar="JSON",
                        help="print the tables and draw the figure of a results file (e.g. a sweep cut short) and exit")
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
            passes = [p for p in PASSES if p in args.passes and not (p == "fwd" and impl in FWD_SAME_AS)]
            if passes:
                groups.append(
                    [Case(impl, p, args.device, args.dtype, tokens, args.hidden, args.vocab) for p in passes]
                )
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


def _measure_group(cases: Sequence[Case], measure: Callable[[Step, Inputs, Case], dict],
                   metrics: Sequence[str]) -> None:
    """Measure each case (the passes of one implementation and size) on one set of inputs, and print each
    record as a line as soon as it is known."""
    inputs = None
    for case in cases:
        record = {**case.record(), **dict.fromkeys(metrics), "status": "ok", "note": None}
        try:
            step = build_step(case)
            if inputs is None:
                inputs = make_inputs(case)
            inputs.clear_grads()
            record.update(measure(step, inputs, case))
        except SkippedCase as exc:
            record.update(status="skipped", note=str(exc))
        except Exception as exc:  # noqa: BLE001  (a result, so that one failing case cannot end the sweep)
            if not _is_out_of_memory(exc):
                traceback.print_exc()
            record.update({name: None for name in metrics}, note=_first_line(exc),
                          status="oom" if _is_out_of_memory(exc) else "error")
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
        self.proc = subprocess.Popen([sys.executable, str(script), WORKER_FLAG], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1)

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
                yield json.loads(line[len(RESULT_PREFIX):])

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
            lost = cases[len(reported):]
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
    code = ("import json, torch; p = torch.cuda.get_device_properties(0); "
            "print(json.dumps(dict(gpu=p.name, gpu_memory_bytes=p.total_memory, cuda=torch.version.cuda)))")
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


def sweep_settings(args: argparse.Namespace) -> dict:
    return {
        "group_size": GROUP_SIZE, "beta": BETA, "clip_eps": CLIP_EPS, "loss": "GRPO + k3 KL, token-mean (bnpo)",
        "hidden": args.hidden, "vocab": args.vocab, "dtype": args.dtype, "tokens": sorted(args.tokens),
        "impls": args.impls, "passes": args.passes,
        "flops_per_pass": {p: flops_formula(p) for p in args.passes},
    }


def write_results(path: Path, env: dict, settings: dict, records: list[dict], complete: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    results = {"environment": env, "settings": settings, "complete": complete, "records": records}
    path.write_text(json.dumps(results, indent=1) + "\n")


def measured_where(env: dict) -> str:
    where = env.get("gpu") or f"{env['cpu']} ({env['torch_threads']} threads)"
    commit = (env["git_commit"] or "unknown")[:7] + {True: "+dirty", False: "", None: ""}[env["git_dirty"]]
    return f"{where}, torch {env['versions']['torch']}, commit {commit}, {env['date'][:10]}"


def format_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def passes_of(records: list[dict]) -> list[str]:
    return [p for p in PASSES if any(r["pass"] == p for r in records)]


def markdown_tables(records: list[dict], cell: Callable[[dict], str]) -> str:
    """Per pass, one row per token count and one column per implementation; non-ok cells show the status."""
    tables = []
    for pass_ in passes_of(records):
        of_pass = [r for r in records if r["pass"] == pass_]
        impls = list(dict.fromkeys(r["impl"] for r in of_pass))
        by_key = {(r["tokens"], r["impl"]): r for r in of_pass}
        rows = [f"{pass_}: {PASS_TITLES[pass_]}\n", "| tokens | " + " | ".join(impls) + " |",
                "|---:|" + "---:|" * len(impls)]
        for tokens in sorted({r["tokens"] for r in of_pass}):
            cells = []
            for impl in impls:
                record = by_key.get((tokens, impl))
                cells.append("" if record is None else cell(record) if record["status"] == "ok" else record["status"])
            rows.append(f"| {tokens} | " + " | ".join(cells) + " |")
        tables.append("\n".join(rows))
    return "\n\n".join(tables)


BASELINE = "apo_kernels"  # the implementation the figures compare every other one with, per token count
BYTE_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))
SECOND_UNITS = (("s", 1.0), ("ms", 1e-3), ("us", 1e-6))
LABEL_FONTSIZE = 8.5
PASS_SHORT = {"fwd": "log-probs under no_grad", "fwd+bwd": "loss step, forward + backward"}
FIGURE_NOTE = (f"Linear axes. Each bar is labelled with its value and, for the other implementations, how {BASELINE} "
               "compares with it at the same N. Cases that ran out of memory, were skipped or failed are named, "
               "not drawn.")


@dataclass(frozen=True)
class Panel:
    """One metric of a figure: a horizontal bar per implementation and token count, on a linear axis."""

    field: str  # record field
    label: str  # axis label; {unit} becomes the axis unit, {flops} the pass's FLOP count
    units: Sequence[tuple[str, float]]  # (name, scale), largest first: the axis takes the largest its maximum reaches
    value_text: Callable[[float], str]  # the label of a bar
    # How the baseline compares with a larger value, a smaller one and about the same, each after the
    # baseline's name with {} the factor, e.g. ("{}x faster", "{}x slower", "about as fast") for time; None:
    # no comparison.
    compare: Optional[tuple[str, str, str]] = None
    detail: Optional[Callable[[dict], Optional[str]]] = None  # more of a record to add to its label, if any


def compare_text(value: float, baseline: float, phrases: tuple[str, str, str]) -> str:
    """``apo_kernels 2.1x faster`` when ``value`` (a peer's time) is 2.1 times ``baseline`` (apo_kernels') and
    ``phrases`` is :class:`Panel`'s ``("{}x faster", "{}x slower", "about as fast")``."""
    ratio = value / baseline
    larger, smaller, same = phrases
    if f"{ratio:.1f}" == "1.0" or f"{1 / ratio:.1f}" == "1.0":
        return f"{BASELINE} {same} ({ratio:.2f}x)"
    return f"{BASELINE} " + (larger.format(f"{ratio:.1f}") if ratio > 1 else smaller.format(f"{1 / ratio:.1f}"))


@dataclass
class BarLabel:
    """A bar's label, its value and (for a peer of the baseline) the comparison, as two texts: one inside
    the bar's end (white), one to its right."""

    x: float  # where the bar ends, in data units
    value: str
    comparison: Optional[str]
    inner: object  # matplotlib Text, right-aligned at x
    outer: object  # matplotlib Text, left-aligned at x

    def options(self) -> list[tuple[str, str]]:
        """(inside, outside) texts, in order of preference: all to the right, all inside, split."""
        full = self.value if self.comparison is None else f"{self.value}  |  {self.comparison}"
        options = [("", f" {full}"), (f"{full} ", "")]
        if self.comparison is not None:
            options.append((f"{self.value} ", f" {self.comparison}"))
        return options


def _draw_panel(ax, panel: Panel, pass_: str, by_key: dict, impls: list[str], tokens: list[int],
                colors: dict) -> list:
    """A group of bars per token count (the smallest on top), a bar per implementation, each labelled;
    returns the labels of the bars."""
    labels = []
    values = [r[panel.field] for r in by_key.values() if r["status"] == "ok" and r[panel.field] is not None]
    top = max(values, default=0.0)
    unit, scale = next(((name, s) for name, s in panel.units if top >= s), panel.units[-1])
    ticks, tick_labels = [], []
    y = 0
    for n in tokens:
        ax.text(0.01, y, f"N = {n} tokens", transform=ax.get_yaxis_transform(), ha="left", va="center",
                fontsize=9, fontweight="bold")
        baseline = by_key.get((n, BASELINE))
        baseline_value = baseline[panel.field] if baseline is not None and baseline["status"] == "ok" else None
        for impl in impls:
            y += 1
            ticks.append(y)
            tick_labels.append(impl)
            record = by_key.get((n, impl))
            if record is None:
                continue
            value = record[panel.field] if record["status"] == "ok" else None
            if value is None:
                ax.text(0, y, f" {record['status']}", ha="left", va="center", fontsize=LABEL_FONTSIZE, style="italic",
                        color="0.35")
                continue
            ax.barh(y, value / scale, height=0.72, color=colors[impl])
            text = panel.value_text(value)
            detail = panel.detail(record) if panel.detail is not None else None
            if detail:
                text += f" ({detail})"
            comparison = None
            if panel.compare and baseline_value and impl != BASELINE:
                comparison = compare_text(value, baseline_value, panel.compare)
            style = dict(va="center", fontsize=LABEL_FONTSIZE, fontweight="bold" if impl == BASELINE else "normal")
            # Placed by _fit_labels: to the right of the bar, in it, or the value in it and the comparison right.
            labels.append(BarLabel(value / scale, text, comparison, ax.text(value / scale, y, "", ha="right",
                                   color="white", **style), ax.text(value / scale, y, "", ha="left", **style)))
        y += 1
    ax.set_yticks(ticks, tick_labels, fontsize=LABEL_FONTSIZE)
    ax.set_ylim(y - 0.4, -0.6)  # inverted: the first token count on top
    ax.set_xlim(0, top / scale * 1.02 if top else 1)
    ax.set_title(f"{pass_}: {PASS_SHORT[pass_]}", fontsize=10)
    ax.set_xlabel(panel.label.format(unit=unit, flops=flops_formula(pass_)), fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    return labels


def _fit_labels(fig, labels_of: dict) -> None:
    """Place each bar label where it stays inside its axes and its bar (:meth:`BarLabel.options`); where
    none fits, the axis grows until one does."""
    renderer = fig.canvas.get_renderer()

    def fits(text_obj, text: str, room: float) -> bool:
        if not text:
            return True
        text_obj.set_text(text)
        return text_obj.get_window_extent(renderer).width <= room - 3

    for _ in range(30):
        grow = set()
        for ax, labels in labels_of.items():
            right = ax.get_window_extent(renderer).x1
            zero = ax.transData.transform((0, 0))[0]
            for label in labels:
                end = ax.transData.transform((label.x, 0))[0]
                fitting = [
                    (inside, outside) for inside, outside in label.options()
                    if fits(label.inner, inside, end - zero) and fits(label.outer, outside, right - end)
                ]
                if not fitting:
                    grow.add(ax)
                    fitting = label.options()[:1]
                label.inner.set_text(fitting[0][0])
                label.outer.set_text(fitting[0][1])
        if not grow:
            return
        for ax in grow:
            low, high = ax.get_xlim()
            ax.set_xlim(low, high * 1.05)


def figure(records: list[dict], panels: Sequence[Panel], title: str):
    """A row per pass, a column per panel; returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_impls = list(dict.fromkeys(r["impl"] for r in records))
    colors = {impl: f"C{i}" for i, impl in enumerate(all_impls)}  # the same in every panel
    rows = []
    for pass_ in passes_of(records):
        of_pass = [r for r in records if r["pass"] == pass_]
        impls = [impl for impl in all_impls if any(r["impl"] == impl for r in of_pass)]
        rows.append((pass_, {(r["tokens"], r["impl"]): r for r in of_pass}, impls,
                     sorted({r["tokens"] for r in of_pass})))
    heights = [0.25 * len(tokens) * (len(impls) + 1) + 1.2 for _, _, impls, tokens in rows]
    title_in, note_in = 0.25 + 0.2 * title.count("\n"), 0.35
    fig_height = sum(heights) + title_in + note_in
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(7 * len(panels), fig_height), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    labels_of = {}
    for ax_row, (pass_, by_key, impls, tokens) in zip(axes, rows):
        for ax, panel in zip(ax_row, panels):
            labels_of[ax] = _draw_panel(ax, panel, pass_, by_key, impls, tokens, colors)
    fig.suptitle(title, fontsize=11)
    fig.text(0.5, 0.08 / fig_height, FIGURE_NOTE, ha="center", va="bottom", fontsize=8, color="0.3", wrap=True)
    layout = dict(rect=(0, note_in / fig_height, 1, 1 - 0.1 / fig_height), h_pad=1.5)
    fig.tight_layout(**layout)
    _fit_labels(fig, labels_of)
    fig.tight_layout(**layout)  # the axes' tick labels may have changed
    return fig


def plot(records: list[dict], panels: Sequence[Panel], title: str, path: Path) -> None:
    """Draw :func:`figure` into ``path`` (PNG, with ``title`` also as its Title metadata)."""
    import matplotlib.pyplot as plt

    fig = figure(records, panels, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Title": title})
    plt.close(fig)


@dataclass(frozen=True)
class Script:
    """What distinguishes ``memory.py`` from ``speed.py``; :func:`run_script` does the rest."""

    name: str  # prefix of the result files
    path: Path  # the script, re-run as each group's worker
    description: str
    title: str  # what one pass measures, for the table and the figure
    cells: str  # what a table cell shows
    measure: Callable[[Step, Inputs, Case], dict]
    metrics: Sequence[str]
    describe: Callable[[dict], str]  # one progress line per case
    cell: Callable[[dict], str]
    panels: list[Panel]  # the figure's columns
    summary: Optional[Callable[[list[dict]], str]] = None
    cpu_tokens: Optional[list[int]] = None


def figure_title(script: Script, env: dict, settings: dict, records: list[dict]) -> str:
    """What was measured (shape, dtype, passes) and where (CPU model or GPU name, torch, commit, date)."""
    passes = " and ".join(passes_of(records))
    return (f"{script.title} ({passes}): D = {settings['hidden']}, V = {settings['vocab']}, {settings['dtype']}, "
            f"{GROUP_SIZE} responses per micro-batch\n{env['device']}: {measured_where(env)}")


def report(script: Script, env: dict, settings: dict, records: list[dict], plot_path: Path) -> None:
    """The tables on stdout and the figure."""
    where = measured_where(env)
    title = f"{script.title}: {settings['dtype']}, D={settings['hidden']}, V={settings['vocab']}"
    print(f"\n{title}\nMeasured on {where}. Cells: {script.cells}.\n")
    print(markdown_tables(records, script.cell))
    if script.summary is not None:
        print("\n" + script.summary(records))
    plot(records, script.panels, figure_title(script, env, settings, records), plot_path)


def _list_cases(script: Script, args: argparse.Namespace, groups: list[list[Case]]) -> None:
    cases = [case for group in groups for case in group]
    workers = len({case.impl for case in cases})
    print(f"{script.name}: {len(cases)} cases in {workers} worker processes on {args.device}, {args.dtype}, "
          f"hidden {args.hidden}, vocab {args.vocab}, tokens {sorted(set(args.tokens), reverse=True)}, passes "
          f"{args.passes}, in this order:")
    for case in cases:
        print(f"  tokens={case.tokens} impl={case.impl} pass={case.pass_}")


def run_script(script: Script) -> None:
    """Worker mode (the groups of cases on stdin), a listing, a replot, or the whole sweep: tables, JSON
    (rewritten after each case) and plot. Exits 1 when a case ended in ``error``."""
    args = parse_sweep_args(script.description, cpu_tokens=script.cpu_tokens)
    if args.worker:
        run_worker(script.measure, script.metrics)
        return
    if args.replot:
        saved = json.loads(args.replot.read_text())
        plot_path = args.plot or args.replot.with_suffix(".png")  # beside the JSON, which is only read
        report(script, saved["environment"], saved["settings"], saved["records"], plot_path)
        print(f"\nwrote {plot_path.resolve()}")
        return
    groups = sweep_groups(args)
    if args.list_cases:
        _list_cases(script, args, groups)
        return
    env = environment(args.device)
    settings = sweep_settings(args)
    json_path, plot_path = output_paths(args, script.name, device_tag(env))
    total = sum(map(len, groups))
    print(f"{script.name}: {args.device} {args.dtype}, hidden {args.hidden}, vocab {args.vocab}, "
          f"tokens {sorted(set(args.tokens), reverse=True)}, passes {args.passes}; {total} cases, results in "
          f"{json_path.resolve()}")
    records = []
    for record in run_groups(script.path, groups, script.metrics):
        records.append(record)
        print(f"[{len(records)}/{total}] {record['impl']:<20} tokens={record['tokens']:<6} "
              f"{record['pass']:<7} {script.describe(record)}", flush=True)
        write_results(json_path, env, settings, records, complete=False)
    write_results(json_path, env, settings, records, complete=True)
    report(script, env, settings, records, plot_path)
    print(f"\nwrote {json_path.resolve()}\n  and {plot_path.resolve()}")
    errors = [r for r in records if r["status"] == "error"]
    if errors:
        sys.exit(f"{len(errors)} case(s) failed with an error (see the notes in {json_path})")
