#!/usr/bin/env bash
# The GPU suite: what whoever gets a GPU machine runs, in one go, in at most 8 minutes on one H200.
#
#   bash benchmarks/gpu_suite.sh --prepare              # developer machine (network): wheels into .whl/
#   bash benchmarks/gpu_suite.sh --dry-run              # anywhere: checks, lists every command and case
#   bash benchmarks/gpu_suite.sh [--out DIR] [--quick]  # GPU machine (no network), .whl/ carried along
#
# A run installs the carried wheels, runs benchmarks/gpu_first_check.py first (versions, the out_dtype addmm,
# tests/kernels/test_gpu.py, one apo_loss step at N = 32768 with its syncs, memory and kernels, one compiled
# call: within 2 minutes), then the rest of tests/kernels (on a GPU: what runs anywhere; the interpreter tests
# skip), then speed.py and memory.py (fwd and fwd+bwd of the implementations of their default sweep on cuda,
# see benchmarks/impls.py, at the Qwen2.5-VL-3B head, N = 32768, 16384, 4096 in that order: a step cut short
# loses the smallest), and kernel_report.py if it exists (on the CPU cores, beside the first check and the
# tests); each step under `timeout`, a failing one recorded and the suite going on; everything it prints also
# goes to DIR/gpu_suite-<date>.log. Results go under $OUT when it is set (on a GPU machine lent through the
# device tool only $OUT comes back). See benchmarks/README.md.
set -uo pipefail # no -e: a step that fails is recorded in the summary and the next one runs

usage() {
    cat <<'USAGE'
usage: bash benchmarks/gpu_suite.sh [--prepare | --dry-run] [--out DIR] [--quick]

  --prepare   download the wheels the GPU machine lacks into .whl/ and record this checkout's commit
              (needs the network and a git checkout; run it right before handing .whl/ to the GPU machine)
  --dry-run   check the layout and .whl/, print every command a run would run, let the first check list
              its steps and the benchmark scripts their cases; needs no GPU, measures nothing
  --out DIR   where results and the log go (default: $OUT when set, as on a GPU machine lent through the
              device tool, whose $OUT comes back; else benchmarks/results)
  --quick     one token count (4096) instead of three
Environment: PYTHON (default python3), APO_COMMIT (the measured commit where the tree is no git
checkout; default: what --prepare recorded in .whl/COMMIT), APO_WHEEL_DIR (default .whl).
USAGE
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
PYTHON=${PYTHON:-python3}
WHEEL_DIR=${APO_WHEEL_DIR:-.whl}
COMMIT_FILE=$WHEEL_DIR/COMMIT
# What the GPU image lacks (checked against its package list): trl and liger-kernel, and what trl imports
# in the backward of its fused log-probs (trl.trainer.utils imports datasets, which needs dill and
# multiprocess). Installed with --no-deps: everything else they import is on the image.
WHEELS=(trl==1.16.0 liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
GPU_PYTHON_VERSION=3.12 # the image's python3; multiprocess ships one wheel per Python version

SHAPE=(--device cuda --hidden 2048 --vocab 151936 --dtype bfloat16)
TOKENS=(32768 16384 4096) # the scripts run them largest first whatever the order here
PASSES=(fwd fwd+bwd)
# No --impls: the scripts' default on cuda, the implementations benchmarks/impls.py runs there by default.
# Time limits of the steps in seconds, set from estimates (no GPU has run the suite yet; set them again from
# the first run's log): the first check ~110 s (its own estimates: python benchmarks/gpu_first_check.py
# --dry-run); the rest of tests/kernels ~15 s (pytest, 2 tests that run anywhere, ~140 skipped); speed ~170 s:
# one worker per implementation (~5 s to start each), a do_bench phase ~1.1 s (~8 s for the reference's ~1 s
# steps at 32768 tokens: ~40 s for the reference in all), Liger's torch.compile ~30 s; memory ~80 s: two passes
# a case, Liger's compile again. The kernel report runs beside the first check and the tests and ends within
# theirs. Install (~10 s) + max(T_FIRST + T_TESTS, T_REPORT) + T_SPEED + T_MEMORY = 465 s; with the summary
# and the interpreter starts the suite ends within 8 minutes (480 s).
T_FIRST=140 T_TESTS=30 T_REPORT=170 T_SPEED=190 T_MEMORY=95
FIRST_CHECK=benchmarks/gpu_first_check.py
REPORT_SCRIPT=benchmarks/kernel_report.py
SITE=/tmp/apo-gpu-suite-site # the carried packages, on PYTHONPATH after the repository

MODE=run
OUT_DIR=${OUT:-benchmarks/results}
while (($#)); do
    case $1 in
        --prepare) MODE=prepare ;;
        --dry-run) MODE=dry-run ;;
        --out)
            [[ $# -ge 2 ]] || { usage >&2; exit 2; }
            OUT_DIR=$2
            shift
            ;;
        --quick) TOKENS=(4096) ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
DATE=$(date -u +%Y%m%d)

wheel_file() { # the carried wheel of a pin (trl==1.16.0 -> .whl/trl-1.16.0-*.whl), or nothing
    local name=${1%%==*} version=${1##*==}
    compgen -G "$WHEEL_DIR/${name//-/_}-$version-*.whl" | head -n 1 # wheel names spell the project with _
}

if [[ $MODE == prepare ]]; then
    mkdir -p "$WHEEL_DIR" || exit 1
    # Pure-Python wheels only, for the GPU machine's Python; never torch or triton (the image has its own).
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON_VERSION" \
        -d "$WHEEL_DIR" "${WHEELS[@]}" || exit 1
    PYTHONPATH="$REPO/benchmarks:$REPO${PYTHONPATH:+:$PYTHONPATH}" \
        "$PYTHON" -c 'import harness; print(harness.commit_label())' >"$COMMIT_FILE" || exit 1
    ls -l "$WHEEL_DIR"
    echo "recorded commit $(<"$COMMIT_FILE") in $COMMIT_FILE"
    echo "on the GPU machine: carry [\"$WHEEL_DIR\"] and run: bash benchmarks/gpu_suite.sh (results under \$OUT)"
    exit 0
fi

# --- checks (run and dry run) ---------------------------------------------------------------------------
for path in apo_kernels/__init__.py tests/kernels benchmarks/harness.py benchmarks/impls.py benchmarks/speed.py \
    benchmarks/memory.py "$FIRST_CHECK"; do
    [[ -e $path ]] || { echo "error: $path is missing: not the apo_kernels repository?" >&2; exit 1; }
done
WHEEL_FILES=()
MISSING_WHEELS=()
for pin in "${WHEELS[@]}"; do
    file=$(wheel_file "$pin")
    if [[ -n $file ]]; then WHEEL_FILES+=("$file"); else MISSING_WHEELS+=("$pin"); fi
done
if ((${#MISSING_WHEELS[@]})); then
    echo "warning: no wheel in $WHEEL_DIR/ for ${MISSING_WHEELS[*]}: run 'bash benchmarks/gpu_suite.sh --prepare'" \
        "on a machine with the network; without them the trl and liger cases end as skipped or error" >&2
fi
if [[ -z ${APO_COMMIT:-} && -f $COMMIT_FILE ]]; then
    APO_COMMIT=$(<"$COMMIT_FILE")
    export APO_COMMIT # read where the tree is no git checkout (harness.environment)
fi
BENCH_ARGS=("${SHAPE[@]}" --tokens "${TOKENS[@]}" --passes "${PASSES[@]}" --out-dir "$OUT_DIR")

# --- steps ----------------------------------------------------------------------------------------------
SUMMARY=()
FAILED=0

record() { # record NAME EXIT_CODE START_SECONDS [LIMIT]: a line of the summary
    local outcome
    case $2 in
        0) outcome=ok ;;
        124 | 137) outcome="TIMED OUT after ${4:-?}s" ;;
        *) outcome="FAILED (exit $2)" ;;
    esac
    (($2 == 0)) || FAILED=1
    SUMMARY+=("$(printf '  %-16s %-24s %4ds' "$1" "$outcome" $((SECONDS - $3)))")
}

step() { # step NAME SECONDS COMMAND...: run it under timeout (dry run: print it) and record the outcome
    local name=$1 seconds=$2 start=$SECONDS rc
    shift 2
    echo
    echo "==> $name (at most ${seconds}s): $*"
    [[ $MODE == dry-run ]] && return 0
    timeout --kill-after=10 "$seconds" "$@"
    rc=$?
    record "$name" $rc "$start" "$seconds"
    return $rc
}

install_wheels() { # pip without an index only unpacks: no time limit needed
    local start=$SECONDS file rc=0
    local pip=("$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
    echo
    echo "==> install: ${pip[*]} <each of: ${WHEEL_FILES[*]:-no wheels}>; PYTHONPATH=$REPO:$SITE"
    [[ $MODE == dry-run ]] && return 0
    rm -rf "$SITE" && mkdir -p "$SITE" || rc=1
    for file in "${WHEEL_FILES[@]}"; do # one at a time: a wheel that does not fit stops only itself
        "${pip[@]}" "$file" || rc=1
    done
    "$PYTHON" - <<'PY' || rc=1
from importlib import metadata
for name in ("torch", "triton", "transformers", "trl", "liger-kernel", "datasets"):
    try:
        print(f"  {name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"  {name}: not installed")
import trl.kernels, trl.trainer.utils, liger_kernel.chunked_loss  # what the trl and liger cases import
PY
    record install $rc "$start"
}

bench() { # bench SCRIPT SECONDS: one benchmark script over the suite's cases
    local script=$1 seconds=$2 rc partial
    if [[ $MODE == dry-run ]]; then
        echo
        echo "--- $script.py --list-cases (argument parsing only):"
        "$PYTHON" "benchmarks/$script.py" "${BENCH_ARGS[@]}" --list-cases || exit 1
    fi
    step "$script" "$seconds" "$PYTHON" "benchmarks/$script.py" "${BENCH_ARGS[@]}"
    rc=$?
    ((rc == 124 || rc == 137)) || return 0
    # Cut short: the JSON holds the records so far (rewritten after each worker); draw what there is.
    partial=$(find "$OUT_DIR" -maxdepth 1 -name "$script-*-$DATE.json" -newer "$MARKER" | head -n 1)
    if [[ -n $partial ]] && "$PYTHON" "benchmarks/$script.py" --replot "$partial" >/dev/null; then
        echo "drew the records so far from $partial"
    fi
}

kernel_report() { # kernel_report start|finish: compiles ahead of time on the CPU cores, beside first check and tests
    local command=("$PYTHON" "$REPORT_SCRIPT" --arch 90 --json "$OUT_DIR/kernel_report-sm90-$DATE.json")
    if [[ ! -f $REPORT_SCRIPT ]]; then
        [[ $1 == finish ]] && return 0
        echo
        echo "==> kernel_report: $REPORT_SCRIPT does not exist (yet): skipped"
        SUMMARY+=("$(printf '  %-16s %-24s' kernel_report "skipped (no script)")")
    elif [[ $MODE == dry-run ]]; then
        [[ $1 == finish ]] && return 0
        echo
        echo "==> kernel_report (at most ${T_REPORT}s, beside the first check and tests/kernels): ${command[*]}"
    elif [[ $1 == start ]]; then
        REPORT_LOG=$(mktemp) REPORT_START=$SECONDS
        timeout --kill-after=10 "$T_REPORT" "${command[@]}" >"$REPORT_LOG" 2>&1 &
        REPORT_PID=$!
    else
        wait "$REPORT_PID"
        local rc=$?
        echo
        echo "==> kernel_report (at most ${T_REPORT}s, ran beside the first check and tests/kernels): ${command[*]}"
        cat "$REPORT_LOG"
        rm -f "$REPORT_LOG"
        record kernel_report $rc "$REPORT_START" "$T_REPORT"
    fi
}

summary() {
    echo
    echo "==> summary: ${SECONDS}s in all"
    printf '%s\n' "${SUMMARY[@]}"
    echo "results in $OUT_DIR:"
    "$PYTHON" - "$OUT_DIR" "$MARKER" <<'PY'
import collections, json, sys
from pathlib import Path

out_dir, since = Path(sys.argv[1]), Path(sys.argv[2]).stat().st_mtime
for path in sorted(p for p in out_dir.iterdir() if p.is_file() and p.stat().st_mtime >= since):
    line = f"  {path.name}"
    results = json.loads(path.read_text()) if path.suffix == ".json" else {}
    if "records" in results:
        counts = collections.Counter(r["status"] for r in results["records"])
        line += f": {sum(counts.values())} records (" + ", ".join(f"{n} {s}" for s, n in counts.items()) + "), "
        line += "complete" if results.get("complete") else "CUT SHORT"
    print(line)
PY
}

suite() {
    echo "apo_kernels GPU suite ($MODE), $(date -u +%FT%TZ), results in $OUT_DIR;" \
        "commit recorded by --prepare (used where git is absent): ${APO_COMMIT:-none}"
    if [[ $MODE == run ]]; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null ||
            echo "nvidia-smi: not available"
        export PYTHONUNBUFFERED=1
        export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
        unset TRITON_INTERPRET # the CPU test setup's switch, not for a GPU
    fi
    install_wheels
    kernel_report start
    if [[ $MODE == dry-run ]]; then
        echo
        echo "--- $FIRST_CHECK --dry-run (its steps and estimates):"
        "$PYTHON" "$FIRST_CHECK" --device cuda --dry-run || exit 1
    fi
    step first_check "$T_FIRST" "$PYTHON" "$FIRST_CHECK" --out-dir "$OUT_DIR"
    # tests/kernels/test_gpu.py ran in the first check
    step tests/kernels "$T_TESTS" "$PYTHON" -m pytest -q -p no:cacheprovider tests/kernels \
        --ignore=tests/kernels/test_gpu.py
    kernel_report finish
    bench speed "$T_SPEED"
    bench memory "$T_MEMORY"
    if [[ $MODE == dry-run ]]; then
        echo
        echo "dry run: layout ok, ${#WHEEL_FILES[@]} of ${#WHEELS[@]} wheels in $WHEEL_DIR/," \
            "the first check and both benchmark scripts parse their arguments"
        return 0
    fi
    summary
    return $FAILED
}

if [[ $MODE == dry-run ]]; then
    suite
    exit $?
fi
mkdir -p "$OUT_DIR" || exit 1
MARKER=$(mktemp) # the files in OUT_DIR at least as new as this are this run's
suite 2>&1 | tee -a "$OUT_DIR/gpu_suite-$DATE.log"
rc=${PIPESTATUS[0]}
rm -f "$MARKER"
exit "$rc"
