"""Registers, spills and shared memory of every Triton kernel the GPU path launches, compiled ahead of time
for Hopper (sm_90) and/or Ampere (sm_80) on a machine without a GPU.

    python benchmarks/kernel_report.py                          # sm_90 and sm_80, Qwen2.5-VL-3B head shape
    python benchmarks/kernel_report.py --arch 90 --json out.json --tokens 4096

What is compiled: the launches of one forward and two backwards (``dlogp`` only, ``dlogp`` and ``dH``) of the
driver's two-pass sweep (``driver.SlabLinearLogprobs``) with the Triton row pass, and of ``apo_loss`` in one
pass (its default: row kernels over a chunk's logits, the epilogue's gradients per chunk) without and with an
entropy bonus, for bfloat16 and float32 hidden/weight, each without and with a bias (in the weight's dtype); and
of ``kernels.apo_epilogue`` on float32 ``(B, T)`` inputs for each of its variants (``variant_configs``: every KL
estimator and policy option). The default shape is the Qwen2.5-VL-3B LM head (D = 2048, V = 151936) on a
32768-token micro-batch; the workspace is the driver's CUDA cap (8 GiB), what ``default_workspace_bytes`` picks
on a 141 GB H200, so the launch counts are those of an H200.


How: the real entry points run on ``meta`` tensors (the kernels' custom ops get their real launchers as
meta kernels, ``launch_recording.py``; ``apo_loss`` under ``devices.meta_as_cuda``, so it takes the CUDA
branches) with ``JITFunction.run`` patched to record each launch (arguments, grid) instead of compiling it.
Each launch is bound and specialized by the JIT's own binder (meta pointers are 0 plus the view's offset, so
their 16-byte alignment is what CUDA's allocator gives), distinct specializations (*variants*) are compiled
with ``triton.compile(..., target=GPUTarget("cuda", arch, 32))``, registers and spills are read from the
``ptxas -v`` log of that very build, and shared memory from Triton's metadata (dynamic shared memory).
``TRITON_INTERPRET`` is removed from the environment first: under the interpreter nothing is compiled.

Output: a table on stdout and, with ``--json``, a list of one object per (variant, arch). The exit status
is 1 when a variant fails to compile, spills, or needs more shared memory than a block may have, unless
``--no-fail``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import launch_recording  # first: it removes TRITON_INTERPRET before triton is imported

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas_version
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from apo_kernels import APOConfig, apo_loss, devices, driver, plan
from apo_kernels.kernels import ROW_PASS, apo_epilogue
from apo_kernels.kernels.apo_epilogue import DPPO_IDS, INPUTS, KL_ESTIMATOR_IDS, variant_configs

TOKENS, HIDDEN, VOCAB = 32768, 2048, 151936
GROUP_SIZE = 8  # the epilogue's (B, T) is one GRPO group of N / 8 tokens each, as the benchmarks run it
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ARCHS = (90, 80)
# Per-block shared memory (opt-in maximum) and per-SM limits of H100 (sm_90) and A100 (sm_80). Both have
# 64K registers, 64 resident warps and 32 resident blocks per SM, and reserve 1 KiB of shared memory per block.
SMEM_PER_BLOCK = {90: 227 * 1024, 80: 163 * 1024}
SMEM_PER_SM = {90: 228 * 1024, 80: 164 * 1024}
SMEM_RESERVED_PER_BLOCK = 1024
REGS_PER_SM, WARPS_PER_SM, BLOCKS_PER_SM = 65536, 64, 32
REG_ALLOC_UNIT = 256  # registers are allocated per warp, in units of 256
KL_NAMES = {i: name for name, i in KL_ESTIMATOR_IDS.items()}
DPPO_NAMES = {i: name for name, i in DPPO_IDS.items()}


@dataclass
class Launch:
    case: str
    fn: JITFunction
    args: tuple
    kwargs: dict
    programs: int


@contextlib.contextmanager
def recording(launches: list, case: str):
    """Append each Triton launch to ``launches`` instead of compiling and running it."""
    with launch_recording.recording(
        lambda fn, args, kwargs, programs: launches.append(Launch(case, fn, args, kwargs, programs))
    ):
        yield


def capture_driver(launches: list, n: int, d: int, v: int, workspace_bytes: int) -> None:
    for dtype_name, dtype in DTYPES.items():
        for has_bias in (False, True):
            name = dtype_name + (" bias" if has_bias else "")
            meta = dict(device="meta", dtype=dtype, requires_grad=True)
            hidden, weight = torch.empty(n, d, **meta), torch.empty(v, d, **meta)
            bias = torch.empty(v, **meta) if has_bias else None
            targets = torch.empty(n, device="meta", dtype=torch.int64)
            with recording(launches, f"{name} fwd"):
                tile = plan.plan_sweep(
                    "two-pass", hidden, weight, bias, ROW_PASS, workspace_bytes, needs_grad=(True, True)
                ).tile
                logp, entropy = driver.SlabLinearLogprobs.apply(
                    hidden, weight, bias, targets, 1.0, ROW_PASS, tile, None
                )
            # an unused entropy reaches the backward as None: the kernel without the entropy term
            with recording(launches, f"{name} bwd dlogp"):
                logp.sum().backward(retain_graph=True)
            with recording(launches, f"{name} bwd dlogp+dH"):
                (logp.sum() + entropy.sum()).backward()


def capture_apo_loss(launches: list, n: int, d: int, v: int, workspace_bytes: int) -> None:
    """The default path of ``apo_loss``: one pass (the folds over a chunk's whole vocabulary row, a fresh fold
    state per chunk, the targets' slices at chunk offsets, the epilogue's gradients per chunk), on meta tensors
    taking the CUDA branches; its backward only scales the saved gradients (no launch)."""
    shape = (GROUP_SIZE, n // GROUP_SIZE) if n % GROUP_SIZE == 0 else (1, n)
    gpu_memory = 16 * workspace_bytes  # a GPU whose default workspace is this one (it is passed anyway)
    for dtype_name, dtype in DTYPES.items():
        for has_bias in (False, True):
            for entropy in (False, True):
                meta = dict(device="meta", dtype=dtype, requires_grad=True)
                tokens = dict(device="meta", dtype=torch.float32)
                hidden, weight = torch.empty(*shape, d, **meta), torch.empty(v, d, **meta)
                with (
                    recording(
                        launches,
                        f"{dtype_name}{' bias' if has_bias else ''} apo_loss one-pass{' entropy' if entropy else ''}",
                    ),
                    devices.meta_as_cuda(gpu_memory),
                ):
                    apo_loss(
                        hidden,
                        weight,
                        torch.empty(shape, device="meta", dtype=torch.int64),
                        torch.empty(shape, device="meta", dtype=torch.bool),
                        torch.empty(shape[0], **tokens),
                        old_logps=torch.empty(shape, **tokens),
                        ref_logps=torch.empty(shape, **tokens),
                        bias=torch.empty(v, **meta) if has_bias else None,
                        config=APOConfig(beta=0.04, entropy_coef=0.01 if entropy else 0.0),
                        backend="triton",
                        workspace_bytes=workspace_bytes,
                        sweep="one-pass",
                    )


def capture_epilogue(launches: list, n: int) -> None:
    shape = (GROUP_SIZE, n // GROUP_SIZE) if n % GROUP_SIZE == 0 else (1, n)
    for name, config in variant_configs().items():
        x = [torch.empty(shape, device="meta", dtype=torch.float32) for _ in INPUTS]
        with recording(launches, name):
            apo_epilogue(*x, config)


@dataclass
class Variant:
    """One specialization of one kernel: what the JIT would compile once and reuse."""

    fn: JITFunction
    options: object
    signature: dict
    constexprs: dict
    attrs: dict
    launches: list

    def declared_constexprs(self) -> dict:
        return {p.name: self.constexprs[(p.num,)] for p in self.fn.params if p.is_constexpr}


def specialize(launches: list, backend) -> list[Variant]:
    """Bind and specialize each launch as ``JITFunction.run`` does; group launches by specialization."""
    variants: dict = {}
    binders: dict = {}
    for launch in launches:
        kwargs = dict(launch.kwargs)
        # the options JITFunction.run adds before binding
        kwargs["debug"] = kwargs.get("debug", launch.fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # not in Triton 3.6, which rejects unknown options
            kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        if launch.fn not in binders:
            binders[launch.fn] = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
        bound, specialization, options = binders[launch.fn](*launch.args, **kwargs)
        key = (launch.fn, repr(specialization), repr(sorted(options.items())))
        if key not in variants:
            packed = launch.fn._pack_args(backend, kwargs, bound, specialization, options)
            variants[key] = Variant(launch.fn, *packed, launches=[])
        variants[key].launches.append(launch)
    kernels = list(dict.fromkeys(launch.fn for launch in launches))
    return sorted(variants.values(), key=lambda v: kernels.index(v.fn))  # grouped by kernel, stable


def _short(value) -> str:
    return str(int(value)) if isinstance(value, bool) else str(value)


def describe(variants: list[Variant]) -> list[str]:
    """Short text per variant: the declared constexprs that differ between variants of the same kernel
    (flags by name when on, ``HAS_`` dropped) and the dtypes of pointer arguments that differ (where given)."""
    texts = []  # words per variant
    for v in variants:
        siblings = [w for w in variants if w.fn is v.fn]
        words = []
        for name, value in v.declared_constexprs().items():
            if len({repr(w.declared_constexprs()[name]) for w in siblings}) == 1:
                continue
            if name == "KL_ESTIMATOR":
                words.append(KL_NAMES[value])
            elif name == "DPPO":  # 0: not DPPO
                words += [DPPO_NAMES[value].upper()] if value else []
            elif isinstance(value, bool):
                words += [name.removeprefix("HAS_")] if value else []
            else:
                words.append(f"{name}={_short(value)}")
        for name, kind in v.signature.items():
            if kind.startswith("*") and len({w.signature[name] for w in siblings} - {"constexpr"}) > 1:
                words.append(f"{name.removesuffix('_ptr')}:{kind[1:]}")
        texts.append(words)
    # Variants that differ only in the JIT's specialization of runtime arguments (e.g. a last slab whose width
    # is not a multiple of 16) get the differing argument named.
    for group in _groups(variants, texts):
        for p in variants[group[0]].fn.params:
            words = [_spec_word(variants[i], p) for i in group]
            if len(set(words)) > 1:
                for i, word in zip(group, words):
                    texts[i].append(word)
    return [" ".join(words) or "(none)" for words in texts]


def _groups(variants: list[Variant], texts: list[list[str]]) -> list[list[int]]:
    by_text: dict = {}
    for i, (v, words) in enumerate(zip(variants, texts)):
        by_text.setdefault((v.fn, tuple(words)), []).append(i)
    return [group for group in by_text.values() if len(group) > 1]


def _spec_word(v: Variant, p) -> str:
    if v.signature[p.name] == "constexpr":
        return f"{p.name}={_short(v.constexprs[(p.num,)])}"
    return f"{p.name}%16{'=' if v.attrs.get((p.num,)) else '!='}0"  # divisibility (pointers: alignment)


def ptxas_usage(log: str) -> dict:
    """Registers, spills and stack frame from a ``ptxas -v`` log."""
    found = {
        key: re.search(pattern, log)
        for key, pattern in (
            ("registers", r"Used (\d+) registers"),
            ("spill_stores", r"(\d+) bytes spill stores"),
            ("spill_loads", r"(\d+) bytes spill loads"),
            ("stack_bytes", r"(\d+) bytes stack frame"),
        )
    }
    if not all(found.values()):
        raise RuntimeError(f"no register/spill counts in the ptxas log: {log!r}")
    return {key: int(m.group(1)) for key, m in found.items()}


def blocks_per_sm(registers: int, warps: int, shared: int, arch: int) -> int:
    """Resident blocks per SM allowed by registers, warps and shared memory (0 when a block cannot launch)."""
    if shared > SMEM_PER_BLOCK[arch]:
        return 0
    regs_per_warp = math.ceil(registers * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    return min(
        BLOCKS_PER_SM,
        WARPS_PER_SM // warps,
        REGS_PER_SM // (regs_per_warp * warps),
        SMEM_PER_SM[arch] // (shared + SMEM_RESERVED_PER_BLOCK),
    )


def compile_variant(v: Variant, arch: int) -> dict:
    row = dict(
        compiled=False,
        registers=None,
        spill_stores=None,
        spill_loads=None,
        spill_bytes=None,
        stack_bytes=None,
        shared_bytes=None,
        blocks_per_sm=None,
        occupancy=None,
        error=None,
    )
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # knobs.nvidia.dump_ptxas_log prints the build's ptxas -v log
            kernel = triton.compile(
                ASTSource(v.fn, v.signature, v.constexprs, v.attrs),
                target=GPUTarget("cuda", arch, 32),
                options=v.options.__dict__,
            )
    except Exception as e:  # noqa: BLE001  (reported per variant; the exit status says it failed)
        row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
        return row
    row.update(compiled=True, shared_bytes=kernel.metadata.shared)
    try:
        row.update(ptxas_usage(log.getvalue()))
    except RuntimeError as e:
        row["error"] = str(e)
        return row
    warps = kernel.metadata.num_warps
    blocks = blocks_per_sm(row["registers"], warps, row["shared_bytes"], arch)
    row.update(
        spill_bytes=row["spill_stores"] + row["spill_loads"],
        blocks_per_sm=blocks,
        occupancy=blocks * warps / WARPS_PER_SM,
    )
    return row


def problems(row: dict) -> list[str]:
    found = []
    if not row["compiled"] or row["error"]:
        found.append(row["error"] or "not compiled")
    if row["spill_bytes"]:
        found.append(f"spills {row['spill_bytes']} bytes")
    if row["shared_bytes"] is not None and row["shared_bytes"] > row["shared_limit"]:
        found.append(f"shared memory {row['shared_bytes']} > {row['shared_limit']} bytes")
    return found


def report(archs: list[int], n: int, d: int, v: int, workspace_bytes: int) -> list[dict]:
    launches: list = []
    capture_driver(launches, n, d, v, workspace_bytes)
    capture_apo_loss(launches, n, d, v, workspace_bytes)
    capture_epilogue(launches, n)
    rows = []
    for arch in archs:
        variants = specialize(launches, make_backend(GPUTarget("cuda", arch, 32)))
        ptxas = re.search(r"release [\d.]+, V(\S+)", get_ptxas_version(arch))
        for variant, text in zip(variants, describe(variants)):
            per_case: dict = {}
            for launch in variant.launches:
                per_case.setdefault(launch.case, []).append(launch.programs)
            rows.append(
                dict(
                    kernel=variant.fn.__name__,
                    variant=text,
                    arch=arch,
                    **compile_variant(variant, arch),
                    shared_limit=SMEM_PER_BLOCK[arch],
                    num_warps=variant.options.num_warps,
                    fp_fusion=variant.options.enable_fp_fusion,
                    constexprs={name: _short(value) for name, value in variant.declared_constexprs().items()},
                    launches=[
                        dict(case=case, launches=len(p), programs_per_launch=sorted(set(p)))
                        for case, p in per_case.items()
                    ],
                    tokens=n,
                    hidden=d,
                    vocab=v,
                    workspace_bytes=workspace_bytes,
                    triton=triton.__version__,
                    ptxas=ptxas.group(1) if ptxas else None,
                )
            )
    return rows


def print_table(rows: list[dict]) -> None:
    columns = (
        "kernel",
        "variant",
        "sm",
        "regs",
        "spill",
        "smem B",
        "warps",
        "CTA/SM",
        "occ",
        "launches x programs",
        "cases",
    )
    table = []
    for r in rows:
        first = r["launches"][0]
        table.append(
            (
                r["kernel"],
                r["variant"],
                str(r["arch"]),
                *(
                    ("FAIL", "", "", "", "", "")
                    if r["registers"] is None
                    else (
                        str(r["registers"]),
                        str(r["spill_bytes"]),
                        str(r["shared_bytes"]),
                        str(r["num_warps"]),
                        str(r["blocks_per_sm"]),
                        f"{r['occupancy']:.0%}",
                    )
                ),
                f"{first['launches']} x {'/'.join(map(str, first['programs_per_launch']))}",
                ", ".join(launch["case"] for launch in r["launches"]),
            )
        )
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(columns)]
    left = {0, 1, len(columns) - 1}
    fmt = lambda cells: "  ".join(
        c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    ).rstrip()
    print(fmt(columns))
    print(fmt(["-" * w for w in widths]))
    for t in table:
        print(fmt(t))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)), help="comma-separated: 90, 80 or both (default)")
    ap.add_argument("--tokens", type=int, default=TOKENS, help=f"N (default {TOKENS})")
    ap.add_argument("--hidden", type=int, default=HIDDEN, help=f"D (default {HIDDEN})")
    ap.add_argument("--vocab", type=int, default=VOCAB, help=f"V (default {VOCAB})")
    ap.add_argument(
        "--workspace-bytes",
        type=int,
        default=plan.CUDA_WORKSPACE_BYTES[1],
        help="the driver's tile budget (default: its CUDA cap, 8 GiB, what an H200 gets; an 80 GB GPU gets 4.95 GiB)",
    )
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--no-fail", action="store_true", help="exit 0 even when a variant fails a check")
    a = ap.parse_args()
    archs = [int(x) for x in a.arch.split(",")]
    if any(arch not in ARCHS for arch in archs):
        ap.error(f"--arch takes {ARCHS}, got {a.arch}")

    knobs.compilation.always_compile = True  # a cache hit would skip ptxas, and with it the -v log
    knobs.nvidia.dump_ptxas_log = True
    # Compiled with the JIT's own FP-fusion default (recorded as fp_fusion); its deprecation notice is noise here.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset")

    launch_recording.register_meta_launchers()
    launch_recording.fix_meta_out_dtype_matmul()
    rows = report(archs, a.tokens, a.hidden, a.vocab, a.workspace_bytes)
    print(f"triton {triton.__version__}, N={a.tokens} D={a.hidden} V={a.vocab}, workspace {a.workspace_bytes} bytes")
    print_table(rows)
    print(
        "regs, spill (stores + loads, bytes): ptxas -v of the build; smem: Triton's dynamic shared memory\n"
        "CTA/SM, occ: resident blocks per SM and the share of its 64 warps they fill (H100 for sm_90, A100 for sm_80)\n"
        "launches x programs: per fwd or bwd pass of the first case listed"
    )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    failed = [(r, p) for r in rows if (p := problems(r))]
    for r, p in failed:
        print(f"FAILED {r['kernel']} [{r['variant']}] sm_{r['arch']}: {'; '.join(p)}", file=sys.stderr)
    return 1 if failed and not a.no_fail else 0


if __name__ == "__main__":
    sys.exit(main())
