"""The benchmark scripts run end to end on CPU at tiny sizes, and the GPU suite's dry run lists what a GPU
run would do.

Every worker is a fresh interpreter (seconds each), so memory.py runs every implementation at one size
(both passes in each worker) and speed.py one implementation at two sizes (one worker); the runs start together when
this module starts (2 cores run two interpreter starts at once, and memory.py's implementations are split
over two runs to keep both busy), and each test waits for those it needs. Two of the runs use the default
output options from a temporary working directory, as a user runs them: they must write there and leave
the checkout as it was.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"
TIMEOUT_S = 300
COMMON_FIELDS = {"impl", "pass", "device", "dtype", "tokens", "hidden", "vocab", "status", "note"}
SCRIPT_FIELDS = {
    "memory": {"peak_bytes", "extra_bytes", "time_s", "loss", "mean_logp"},
    "speed": {"forward_s", "backward_s", "total_s", "flops", "tflops", "matmul_tflops", "matmul_share"},
}
HIDDEN, VOCAB = 16, 64
RUNS = {  # run: script, impls, tokens (apo_kernels-torch left out: on CPU it runs what apo_kernels runs)
    "memory-own": ("memory", ["reference", "apo_kernels", "apo_kernels-two-pass", "apo_kernels-logprobs"], [16]),
    "memory-others": ("memory", ["liger", "trl"], [16]),
    "speed": ("speed", ["apo_kernels"], [8, 16]),
}
# Runs with the default output options (no --out-dir, --json, --plot), from a temporary working directory.
DEFAULT_OUTPUT_RUNS = {"memory-others", "speed"}
LOCAL_OUT_DIR = "benchmark-results"  # where they write by default, in the working directory (git-ignored)
# Our own paths have no optional dependency: they must run.
OWN_IMPLS = {"reference", "apo_kernels", "apo_kernels-two-pass", "apo_kernels-logprobs"}
SUITE_WHEELS_PRESENT = ["trl-1.16.0-py3-none-any.whl", "liger_kernel-0.8.5-py3-none-any.whl"]


def _import_benchmarks(*names: str) -> list:
    """The benchmark modules, imported as the scripts import one another: by name, from ``benchmarks/``."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return [importlib.import_module(name) for name in names]
    finally:
        sys.path.remove(str(BENCHMARKS))


harness, impls, report = _import_benchmarks("harness", "impls", "report")


def _user_env(**extra) -> dict:
    # Benchmarks run as users run them: the test session's Triton interpreter switch is not theirs, nor a
    # device machine's $OUT (which would take the results).
    return {**{k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", harness.OUT_ENV)}, **extra}


def _git_status() -> set[str]:
    """The checkout's status, ignored files included (a result written into an ignored folder of the
    checkout would still dirty it)."""
    out = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=all", "--ignored"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.splitlines())


class Run:
    """A command started now, waited for by the test that needs its output (kept in files, so that a full
    pipe cannot stall it meanwhile)."""

    def __init__(self, argv: list[str], env: dict, logs: Path, cwd: Path = REPO, **paths: Path):
        self.stdout, self.stderr = logs / "stdout", logs / "stderr"
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=cwd)
        self.cwd = cwd
        self.paths = paths

    def output(self) -> tuple[int, str, str]:
        self.proc.wait(timeout=TIMEOUT_S)
        return self.proc.returncode, self.stdout.read_text(), self.stderr.read_text()


@pytest.fixture(scope="module")
def git_status_before() -> set[str]:
    return _git_status()


@pytest.fixture(scope="module", autouse=True)
def runs(tmp_path_factory, git_status_before):
    started = {}
    for name, (script, run_impls, tokens) in RUNS.items():
        out = tmp_path_factory.mktemp(name)
        argv = [
            sys.executable,
            str(BENCHMARKS / f"{script}.py"),
            "--device",
            "cpu",
            "--hidden",
            str(HIDDEN),
            "--vocab",
            str(VOCAB),
            "--dtype",
            "float32",
            "--tokens",
            *map(str, tokens),
            "--impls",
            *run_impls,
            "--passes",
            *harness.PASSES,
        ]
        if name in DEFAULT_OUTPUT_RUNS:  # the files are found when the run has finished (_finished)
            logs = tmp_path_factory.mktemp(f"{name}-logs")
            started[name] = Run(argv, _user_env(), logs, cwd=out)
        else:
            json_path, plot_path = out / "results.json", out / "plot.png"
            started[name] = Run(
                argv + ["--json", str(json_path), "--plot", str(plot_path)],
                _user_env(),
                out,
                json=json_path,
                plot=plot_path,
            )
    # A wheel folder holding two of the suite's wheels (empty files: the dry run only looks for them).
    wheels = tmp_path_factory.mktemp("whl")
    for name in SUITE_WHEELS_PRESENT:
        (wheels / name).touch()
    out = tmp_path_factory.mktemp("suite-out")
    started["dry-run"] = Run(
        ["bash", str(BENCHMARKS / "gpu_suite.sh"), "--dry-run", "--out", str(out)],
        _user_env(PYTHON=sys.executable, APO_WHEEL_DIR=str(wheels)),
        tmp_path_factory.mktemp("suite-logs"),
        out=out,
    )
    yield started
    for run in started.values():
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()


# --- in-process checks, while the runs go on ------------------------------------------------------------------


def test_trl_vocab_chunk_is_what_grpo_trainer_passes():
    # Read from trl's source: importing trl.trainer takes seconds.
    trl_spec = importlib.util.find_spec("trl")
    if trl_spec is None:
        pytest.skip("trl is not installed")
    source = (Path(trl_spec.origin).parent / "trainer" / "utils.py").read_text()
    assert f"_CHUNKED_LOGPROB_CHUNK_SIZE = {impls.TRL_VOCAB_CHUNK}\n" in source


def test_device_defaults():
    cuda = harness.parse_sweep_args("", ["--device", "cuda", "--list-cases"])  # listing needs no GPU
    assert (cuda.hidden, cuda.vocab, cuda.dtype) == (2048, 151936, "bfloat16")
    assert {4096, 16384, 32768} <= set(cuda.tokens)
    # Every implementation but the torch backend (on request), as the GPU suite runs them.
    assert cuda.passes == ["fwd", "fwd+bwd"] and cuda.impls == [
        "reference",
        "apo_kernels",
        "apo_kernels-two-pass",
        "apo_kernels-logprobs",
        "liger",
        "trl",
    ]
    cpu = harness.parse_sweep_args("", ["--device", "cpu"])
    assert cpu.passes == ["fwd+bwd"]  # the CPU sweep's run time stays what it was
    assert cpu.impls == ["reference", "apo_kernels", "apo_kernels-two-pass", "liger", "trl"]


def test_each_impl_has_a_fwd_pass_of_its_own_or_names_one_that_has():
    for name, impl in impls.IMPLS.items():
        assert impl.fwd_same_as is None or impls.IMPLS[impl.fwd_same_as].logprobs is not None, name


def test_a_missing_or_too_old_package_skips_the_case():
    with pytest.raises(impls.SkippedCase, match="not installed"):
        impls._check_requirements(("no-such-package-anywhere",))
    with pytest.raises(impls.SkippedCase, match="needs torch>=999"):
        impls._check_requirements(("torch>=999",))
    impls._check_requirements(("torch>=2",))


def test_sweep_groups_run_the_largest_size_first_and_the_passes_of_one_impl_and_size_together():
    args = harness.parse_sweep_args(
        "",
        [
            "--device",
            "cpu",
            "--tokens",
            "8",
            "24",
            "16",
            "--impls",
            "apo_kernels",
            "apo_kernels-logprobs",
            "--passes",
            "fwd+bwd",
            "fwd",
        ],
    )
    groups = harness.sweep_groups(args)
    assert [[(c.tokens, c.impl, c.pass_) for c in group] for group in groups] == [
        [(24, "apo_kernels", "fwd"), (24, "apo_kernels", "fwd+bwd")],
        [(24, "apo_kernels-logprobs", "fwd+bwd")],  # its fwd is apo_kernels' (fwd_same_as)
        [(16, "apo_kernels", "fwd"), (16, "apo_kernels", "fwd+bwd")],
        [(16, "apo_kernels-logprobs", "fwd+bwd")],
        [(8, "apo_kernels", "fwd"), (8, "apo_kernels", "fwd+bwd")],
        [(8, "apo_kernels-logprobs", "fwd+bwd")],
    ]
    case = groups[0][1]
    assert harness.Case.from_record(case.record()) == case and case.record()["pass"] == "fwd+bwd"


def test_results_go_under_out_when_it_is_set(monkeypatch, tmp_path):
    monkeypatch.delenv(harness.OUT_ENV, raising=False)
    assert harness.parse_sweep_args("", ["--device", "cpu"]).out_dir == harness.LOCAL_OUT_DIR
    monkeypatch.setenv(harness.OUT_ENV, str(tmp_path))  # as on a GPU machine of the device tool
    assert harness.parse_sweep_args("", ["--device", "cpu"]).out_dir == tmp_path
    assert harness.parse_sweep_args("", ["--device", "cpu", "--out-dir", "elsewhere"]).out_dir == Path("elsewhere")


DYING_WORKER = """
import os, sys
sys.path.insert(0, {benchmarks!r})
import harness

def measure(step, inputs, case):
    if case.tokens == 16 and case.impl == "apo_kernels":
        os._exit(3)
    return {{"pid": os.getpid()}}

if __name__ == "__main__" and harness.WORKER_FLAG in sys.argv:
    harness.run_worker(measure, ["pid"])
"""


def test_one_worker_per_impl_and_a_dying_worker_costs_only_its_cases(tmp_path):
    script = tmp_path / "dying_worker.py"
    script.write_text(DYING_WORKER.format(benchmarks=str(BENCHMARKS)))
    args = harness.parse_sweep_args(
        "",
        [
            "--device",
            "cpu",
            "--hidden",
            "4",
            "--vocab",
            "8",
            "--tokens",
            "8",
            "16",
            "24",
            "--impls",
            "apo_kernels",
            "reference",
            "--passes",
            "fwd+bwd",
        ],
    )
    records = list(harness.run_groups(script, harness.sweep_groups(args), ["pid"]))
    assert [(r["tokens"], r["impl"], r["status"]) for r in records] == [
        (24, "apo_kernels", "ok"),
        (24, "reference", "ok"),
        (16, "apo_kernels", "error"),
        (16, "reference", "ok"),
        (8, "apo_kernels", "ok"),
        (8, "reference", "ok"),
    ]
    assert "worker exited with code 3" in records[2]["note"]
    pids = {impl: {r["pid"] for r in records if r["impl"] == impl and r["status"] == "ok"} for impl in impls.IMPLS}
    assert len(pids["reference"]) == 1  # one process for all its sizes
    assert len(pids["apo_kernels"]) == 2  # a fresh one after the death


def test_commit_falls_back_to_apo_commit_outside_a_checkout(monkeypatch, tmp_path):
    monkeypatch.setattr(harness, "REPO", tmp_path)  # a copy of the tree without git, as on a GPU machine
    monkeypatch.setenv("APO_COMMIT", "0123abc+dirty")
    assert harness._commit() == {"git_commit": "0123abc", "git_dirty": True, "git_commit_source": "APO_COMMIT"}
    monkeypatch.delenv("APO_COMMIT")
    assert harness._commit()["git_commit"] is None


# --- the script runs --------------------------------------------------------------------------------------


def _finished(run: Run) -> tuple[str, dict]:
    returncode, stdout, stderr = run.output()
    assert returncode == 0, stderr[-3000:]
    if "json" not in run.paths:  # default output options: <script>-cpu-<date>.{json,png} in ./benchmark-results
        found = sorted((run.cwd / LOCAL_OUT_DIR).glob("*.json"))
        assert len(found) == 1, f"no single results file in ./{LOCAL_OUT_DIR} of the run's working directory: {found}"
        json_path = found[0]
        run.paths.update(json=json_path, plot=json_path.with_suffix(".png"))
    return stdout, json.loads(run.paths["json"].read_text())


def _png_title(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as image:
        return image.text["Title"]


def _check_records(run_name: str, stdout: str, results: dict) -> list[dict]:
    script, run_impls, tokens = RUNS[run_name]
    assert "fwd: forward only" in stdout and "fwd+bwd: loss step" in stdout and "| tokens |" in stdout
    assert {"date", "device", "git_commit", "git_commit_source", "versions"} <= results["environment"].keys()
    assert results["complete"] and results["settings"]["passes"] == list(harness.PASSES)
    records = results["records"]
    expected = [
        (n, i, p)
        for n in tokens
        for i in run_impls
        for p in harness.PASSES
        if not (p == "fwd" and impls.IMPLS[i].fwd_same_as)
    ]
    assert sorted((r["tokens"], r["impl"], r["pass"]) for r in records) == sorted(expected)
    for record in records:
        assert record.keys() == COMMON_FIELDS | SCRIPT_FIELDS[script]
        assert record["status"] in ("ok", "oom", "skipped"), record
        assert (record["device"], record["hidden"], record["vocab"]) == ("cpu", HIDDEN, VOCAB)
    assert all(r["status"] == "ok" for r in records if r["impl"] in OWN_IMPLS)
    return [r for r in records if r["status"] == "ok"]


def test_memory_records_and_same_results(runs):
    ok = []
    for name in ("memory-own", "memory-others"):
        stdout, results = _finished(runs[name])
        ok += _check_records(name, stdout, results)
        assert runs[name].paths["plot"].stat().st_size > 0
    # Every implementation computes the same loss (fwd+bwd) and log-probs (fwd) on the same inputs.
    for pass_, field, other in (("fwd+bwd", "loss", "mean_logp"), ("fwd", "mean_logp", "loss")):
        of_pass = [r for r in ok if r["pass"] == pass_]
        values = [r[field] for r in of_pass]
        assert len(values) >= 3 and all(r[other] is None for r in of_pass), of_pass
        assert max(values) - min(values) <= 1e-4 * max(1.0, abs(values[0])), of_pass
        assert all(r["peak_bytes"] > 0 and r["extra_bytes"] >= 0 for r in of_pass)


def test_speed_records_and_flop_counts(runs):
    stdout, results = _finished(runs["speed"])
    ok = _check_records("speed", stdout, results)
    assert runs["speed"].paths["plot"].stat().st_size > 0
    assert "6 N D V for fwd+bwd" in stdout and "2 N D V for fwd" in stdout
    assert results["settings"]["flops_per_pass"] == {"fwd": "2 N D V", "fwd+bwd": "6 N D V"}
    for r in ok:
        assert r["flops"] == {"fwd": 2, "fwd+bwd": 6}[r["pass"]] * r["tokens"] * HIDDEN * VOCAB
        assert r["tflops"] == pytest.approx(r["flops"] / r["total_s"] / 1e12)
        assert r["matmul_tflops"] is None  # the GEMM probe runs on cuda only
        if r["pass"] == "fwd":
            assert r["backward_s"] is None and r["forward_s"] == r["total_s"] > 0
        else:
            assert r["forward_s"] > 0 and r["backward_s"] > 0 and r["total_s"] > 0


def test_default_output_goes_to_the_working_directory_not_the_checkout(runs, git_status_before):
    for name in sorted(DEFAULT_OUTPUT_RUNS):
        script = RUNS[name][0]
        stdout, results = _finished(runs[name])
        out_dir = runs[name].cwd / LOCAL_OUT_DIR
        names = sorted(p.name for p in out_dir.iterdir())
        assert len(names) == 2 and re.fullmatch(rf"{script}-cpu-\d{{8}}\.json", names[0]), names
        assert names[1] == names[0].replace(".json", ".png") and results["complete"]
        # Where the files went, as absolute paths.
        assert f"wrote {runs[name].paths['json'].resolve()}\n  and {runs[name].paths['plot'].resolve()}" in stdout
    # No result file in the checkout (others may edit it meanwhile: only the benchmarks' files are looked for).
    new = _git_status() - git_status_before
    assert not [line for line in new if re.search(r"(memory|speed)-|benchmark-results|benchmarks/results", line)], new


def test_figure_title_names_shape_dtype_device_and_passes(runs):
    for name in ("memory-own", "speed"):
        _stdout, results = _finished(runs[name])
        title = _png_title(runs[name].paths["plot"])
        assert f"D = {HIDDEN}, V = {VOCAB}, float32" in title, title
        assert "(fwd and fwd+bwd)" in title and results["environment"]["cpu"] in title, title


def test_bar_labels_compare_with_apo_kernels_and_stay_in_their_axes():
    assert report.compare_text(6.15, 3.24, ("{}x faster", "{}x slower", "about as fast")) == "apo_kernels 1.9x faster"
    assert report.compare_text(1.0, 2.0, ("uses {}x less", "uses {}x more", "about")) == "apo_kernels uses 2.0x more"
    assert report.compare_text(3.30, 3.24, ("{}x faster", "{}x slower", "about as fast")).startswith(
        "apo_kernels about as fast"
    )
    # Values over three orders of magnitude, as apo_kernels' 36 MiB and the reference's 9 GiB; and an oom.
    mib = 2**20
    sizes = {"reference": 9000 * mib, "apo_kernels": 36 * mib, "liger": 150 * mib, "trl": 4500 * mib}
    records = [
        {"impl": impl, "pass": "fwd+bwd", "tokens": n, "status": "ok", "extra_bytes": size * n // 4096}
        for n in (512, 4096)
        for impl, size in sizes.items()
    ]
    records[0]["status"] = "oom"
    panel = report.Panel(
        "extra_bytes",
        "extra memory ({unit})",
        report.BYTE_UNITS,
        report.format_bytes,
        compare=("uses {}x less", "uses {}x more", "uses about as much"),
    )
    fig = report.figure(records, [panel, panel], "a title")
    renderer = fig.canvas.get_renderer()
    texts = {}
    for ax in fig.axes:
        box = ax.get_window_extent(renderer)
        for text in ax.texts:
            if text.get_text():
                extent = text.get_window_extent(renderer)
                assert box.x0 <= extent.x0 and extent.x1 <= box.x1, text.get_text()
                texts[text.get_text().strip()] = text
    assert fig.axes[0].get_xlabel() == "extra memory (GiB)"
    assert "36.00 MiB" in texts and "oom" in texts
    assert any("apo_kernels uses 250.0x less" in t for t in texts)  # the reference at 4096 tokens
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_replot_draws_a_results_file_beside_it(runs, tmp_path):
    _finished(runs["memory-own"])
    saved = tmp_path / "saved.json"  # --replot draws beside the file and leaves the file as it was
    saved.write_bytes(runs["memory-own"].paths["json"].read_bytes())
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "memory.py"), "--replot", str(saved)],
        capture_output=True,
        text=True,
        env=_user_env(),
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plot_path = tmp_path / "saved.png"
    assert "| tokens |" in proc.stdout and f"wrote {plot_path}" in proc.stdout
    assert f"D = {HIDDEN}, V = {VOCAB}, float32" in _png_title(plot_path)
    assert saved.read_bytes() == runs["memory-own"].paths["json"].read_bytes()


def test_gpu_suite_dry_run_lists_the_suite(runs):
    returncode, stdout, stderr = runs["dry-run"].output()
    assert returncode == 0, stderr[-3000:]
    # Missing wheels are a warning, not a failure: the dry run works on a checkout without .whl/.
    missing = re.search(r"warning: no wheel in \S+ for (.*?): run", stderr)
    assert missing and missing.group(1).split() == ["datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19"]
    assert "2 of 5 wheels" in stdout
    commands = [line for line in stdout.splitlines() if line.startswith("==> ")]
    assert any("pip install" in c and "--no-index --no-deps" in c for c in commands)
    out = runs["dry-run"].paths["out"]
    # The first check first, then the rest of tests/kernels (test_gpu.py ran in the first check), then the scripts.
    steps = {c.split()[1].rstrip(":"): c for c in commands}
    assert [s for s in steps if s not in ("install", "kernel_report")] == [
        "first_check",
        "tests/kernels",
        "speed",
        "memory",
    ], commands
    assert f"benchmarks/gpu_first_check.py --out-dir {out}" in steps["first_check"]
    assert "gpu_first_check on cuda: apo_loss at N = 32768, D = 2048, V = 151936" in stdout  # its --dry-run
    assert any("-m pytest" in c and "tests/kernels --ignore=tests/kernels/test_gpu.py" in c for c in commands)
    # No --impls: the scripts' default on cuda (test_device_defaults), listed below.
    shape = (
        "--device cuda --hidden 2048 --vocab 151936 --dtype bfloat16 --tokens 32768 16384 4096 --passes fwd "
        f"fwd+bwd --out-dir {out}"
    )
    for script in ("speed", "memory"):
        assert any(f"benchmarks/{script}.py {shape}" in c for c in commands), commands
        # The scripts parsed those arguments and listed their cases (none ran), the headline size first.
        listing = stdout[
            stdout.index(f"{script}: 30 cases in 6 worker processes on cuda, bfloat16, hidden 2048, vocab 151936") :
        ]
        assert listing.splitlines()[1] == "  tokens=32768 impl=reference pass=fwd"
    kernel_report = [c for c in commands if "kernel_report" in c]
    assert len(kernel_report) == 1
    if (BENCHMARKS / "kernel_report.py").exists():
        assert f"kernel_report.py --arch 90 --json {out}/kernel_report-sm90-" in kernel_report[0]
    assert not any(out.iterdir())  # a dry run writes nothing
