#!/usr/bin/env python
"""Roofline model of the slab driver at the Qwen2.5-VL-3B head: FLOPs, bytes and predicted time per phase,
for the two-pass sweep (logits recomputed in backward) and the one-pass sweep of ``apo_loss`` (gradients
in the forward).

A model, not a measurement: matmuls run at an assumed fraction of the dense bf16 peak (cuBLAS at these
shapes), row passes at an assumed fraction of the HBM bandwidth, phases one after another (one stream),
each phase's time the larger of its compute and memory times. The tiles are the ones
``apo_kernels.plan.plan_sweep`` picks for the Triton row pass under the workspace budget (default 5 GiB,
what ``default_workspace_bytes`` gives on an 80 GB GPU). ``python benchmarks/roofline.py`` prints the
markdown tables of ``apo_kernels/kernels/README.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from apo_kernels.plan import plan_sweep  # noqa: E402
from apo_kernels.kernels.row_pass import TritonRowPass  # noqa: E402

GPUS = {  # dense bf16 peak (FLOP/s), HBM bandwidth (B/s)
    "H100 SXM": (989.5e12, 3.35e12),
    "H200": (989.5e12, 4.8e12),
}
BF16, FP32 = 2, 4
# Assumed efficiencies: cuBLAS at these shapes (TRL #7244 measured 74% for an LM head) and the row passes' share
# of HBM bandwidth.
MM_EFFICIENCY, BANDWIDTH_EFFICIENCY = 0.78, 0.85


def plan(n: int, d: int, v: int, workspace: int, sweep: str):
    """The driver's plan for bf16 ``(n, d)`` hidden states and a ``(v, d)`` head, both trained (meta tensors)."""
    hidden = torch.empty(n, d, dtype=torch.bfloat16, device="meta")
    weight = torch.empty(v, d, dtype=torch.bfloat16, device="meta")
    return plan_sweep(sweep, hidden, weight, None, TritonRowPass(), workspace, needs_grad=(True, True))


def two_pass_phases(n: int, d: int, v: int, tile):
    """``(name, flops, bytes, kind)`` of one forward + backward (``kind``: ``"mm"`` or ``"row"``), bf16 inputs,
    gradients of the log-probs and entropies, no bias."""
    slabs = -(-v // tile.cols)
    chunks = -(-n // tile.rows)
    logits = n * v
    x_reads = slabs * n * d * BF16  # X is read once per slab
    w_reads = chunks * v * d * BF16  # W once per token chunk
    return [
        ("fwd: logits X W^T (fp32 out)", 2 * n * d * v, x_reads + w_reads + logits * FP32, "mm"),
        ("fwd: logprob_fold", 5 * logits, logits * FP32, "row"),
        ("bwd: logits X W^T (recompute)", 2 * n * d * v, x_reads + w_reads + logits * FP32, "mm"),
        ("bwd: logit_grad (dz in bf16)", 8 * logits, logits * (FP32 + BF16), "row"),
        # dX (fp32, N x D) is read and written once per slab, inside the matmul
        ("bwd: dX += dz W_s", 2 * n * d * v, logits * BF16 + w_reads + 2 * slabs * n * d * FP32, "mm"),
        ("bwd: dW_s = dz^T X", 2 * n * d * v, logits * BF16 + x_reads + v * d * (FP32 + BF16), "mm"),
    ]


def one_pass_phases(n: int, d: int, v: int, tile):
    """The same for the one-pass sweep: per chunk of ``tile.rows`` tokens, the logits of the whole vocabulary
    (one matmul), the row passes slab by slab, ``dX_c = dz W`` and ``dW += dz^T X_c`` (the float32 ``dW``
    read and written once per chunk, inside the matmul); backward scales and rounds the saved gradients."""
    chunks = -(-n // tile.rows)
    logits = n * v
    w_reads = chunks * v * d * BF16
    return [
        ("fwd: logits X_c W^T (fp32 out)", 2 * n * d * v, n * d * BF16 + w_reads + logits * FP32, "mm"),
        ("fwd: logprob_fold", 5 * logits, logits * FP32, "row"),
        ("fwd: logit_grad (dz in bf16)", 8 * logits, logits * (FP32 + BF16), "row"),
        ("fwd: dX_c = dz W", 2 * n * d * v, logits * BF16 + w_reads + n * d * FP32, "mm"),
        ("fwd: dW += dz^T X_c (fp32)", 2 * n * d * v, logits * BF16 + n * d * BF16 + 2 * chunks * v * d * FP32, "mm"),
        ("bwd: scale dW, dX into bf16", 2 * (v + n) * d, (v + n) * d * (FP32 + BF16), "row"),
    ]


def predicted_seconds(
    flops: float,
    nbytes: float,
    kind: str,
    gpu: str,
    mm_eff: float = MM_EFFICIENCY,
    bw_eff: float = BANDWIDTH_EFFICIENCY,
) -> float:
    peak, bandwidth = GPUS[gpu]
    compute = flops / (peak * (mm_eff if kind == "mm" else 1.0))
    memory = nbytes / (bandwidth * bw_eff)
    return max(compute, memory)


def table(tokens, d: int, v: int, workspace: int, mm_eff: float, bw_eff: float) -> str:
    lines = [
        f"Model: matmuls at {mm_eff:.0%} of 989.5 TFLOP/s, row passes at {bw_eff:.0%} of HBM bandwidth "
        f"(H100 SXM 3.35 TB/s, H200 4.8 TB/s), D = {d}, V = {v}, bf16, workspace {workspace / 2**20:,.0f} MiB.",
        "",
        "| N | sweep | phase | GFLOP | GB moved | H100 ms | H200 ms |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    summary = []
    for n in tokens:
        totals = {}
        for sweep, phases in (("two-pass", two_pass_phases), ("one-pass", one_pass_phases)):
            sweep_plan = plan(n, d, v, workspace, sweep)
            totals[sweep] = {gpu: 0.0 for gpu in GPUS}
            fwd = {gpu: 0.0 for gpu in GPUS}
            for name, flops, nbytes, kind in phases(n, d, v, sweep_plan.tile):
                times = {gpu: predicted_seconds(flops, nbytes, kind, gpu, mm_eff, bw_eff) for gpu in GPUS}
                for gpu, t in times.items():
                    totals[sweep][gpu] += t
                    fwd[gpu] += t if sweep == "two-pass" and name.startswith("fwd") else 0.0
                lines.append(
                    f"| {n} | {sweep} | {name} | {flops / 1e9:,.0f} | {nbytes / 1e9:,.1f} | "
                    f"{times['H100 SXM'] * 1e3:.1f} | {times['H200'] * 1e3:.1f} |"
                )
            tile, memory = sweep_plan.tile, sweep_plan.extra_bytes
            if sweep == "two-pass":
                fwd_cells = " | ".join(
                    f"{fwd[gpu] * 1e3:.1f} ms ({2 * n * d * v / fwd[gpu] / 989.5e12:.0%})" for gpu in GPUS
                )
            summary.append(
                f"| {n} | {sweep} | {tile.rows} x {tile.cols} | {memory / 2**20:,.0f} MiB | "
                + " | ".join(
                    f"{totals[sweep][gpu] * 1e3:.1f} ms ({6 * n * d * v / totals[sweep][gpu] / 989.5e12:.0%})"
                    for gpu in GPUS
                )
                + " |"
            )
        summary.append(f"| {n} | forward only | | | {fwd_cells} |")
        summary.append(
            f"| {n} | one pass / two | | | "
            + " | ".join(f"{totals['two-pass'][gpu] / totals['one-pass'][gpu]:.2f}x faster" for gpu in GPUS)
            + " |"
        )
    lines += [
        "",
        "Totals: forward + backward, percent of the 989.5 TFLOP/s bf16 peak on 6NDV (the least a loss step "
        "needs); forward only (the log-prob pass under no_grad) on 2NDV. The tile is tokens x columns (one pass: "
        "the chunk x the row pass's slab); extra memory beyond the inputs and their gradients:",
        "",
        "| N | sweep | tile | extra memory | H100 | H200 |",
        "|---:|---|---|---:|---:|---:|",
        *summary,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--workspace-bytes", type=int, default=5 * 2**30)
    parser.add_argument(
        "--mm-efficiency",
        type=float,
        default=MM_EFFICIENCY,
        help="fraction of the bf16 peak cuBLAS reaches (TRL #7244 measured 74%% for an LM head)",
    )
    parser.add_argument("--bandwidth-efficiency", type=float, default=BANDWIDTH_EFFICIENCY)
    args = parser.parse_args()
    print(
        table(args.tokens, args.hidden, args.vocab, args.workspace_bytes, args.mm_efficiency, args.bandwidth_efficiency)
    )


if __name__ == "__main__":
    main()
