#!/usr/bin/env python
"""Roofline model of the slab driver at the Qwen2.5-VL-3B head: FLOPs, bytes and predicted time per phase.

A model, not a measurement: matmuls run at an assumed fraction of the dense bf16 peak (cuBLAS at these
shapes), row passes at an assumed fraction of the HBM bandwidth, phases one after another (one stream).
The tile is the one ``apo_kernels.driver.plan_tile`` picks for the Triton row pass under the default 1 GiB
budget. ``python benchmarks/roofline.py`` prints the markdown table of ``apo_kernels/kernels/README.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apo_kernels.driver import extra_memory_bytes, plan_tile  # noqa: E402

GPUS = {  # dense bf16 peak (FLOP/s), HBM bandwidth (B/s)
    "H100 SXM": (989.5e12, 3.35e12),
    "H200": (989.5e12, 4.8e12),
}
BF16, FP32 = 2, 4


def phases(n: int, d: int, v: int, workspace: int):
    """``(name, flops, bytes, kind)`` of one forward + backward (``kind``: ``"mm"`` or ``"row"``), bf16 inputs,
    gradients of the log-probs and entropies, no bias."""
    tile = plan_tile(n, v, FP32 + BF16, workspace)
    slabs = -(-v // tile.cols)
    chunks = -(-n // tile.rows)
    logits = n * v
    x_reads = slabs * n * d * BF16  # X is read once per slab
    w_reads = chunks * v * d * BF16  # W once per token chunk
    return tile, [
        ("fwd: logits X W^T (fp32 out)", 2 * n * d * v, x_reads + w_reads + logits * FP32, "mm"),
        ("fwd: logprob_fold", 5 * logits, logits * FP32, "row"),
        ("bwd: logits X W^T (recompute)", 2 * n * d * v, x_reads + w_reads + logits * FP32, "mm"),
        ("bwd: logit_grad (dz in bf16)", 8 * logits, logits * (FP32 + BF16), "row"),
        # dX (fp32, N x D) is read and written once per slab, inside the matmul
        ("bwd: dX += dz W_s", 2 * n * d * v, logits * BF16 + w_reads + 2 * slabs * n * d * FP32, "mm"),
        ("bwd: dW_s = dz^T X", 2 * n * d * v, logits * BF16 + x_reads + v * d * (FP32 + BF16), "mm"),
    ]


def predicted_seconds(flops: float, nbytes: float, kind: str, gpu: str, mm_eff: float, bw_eff: float) -> float:
    peak, bandwidth = GPUS[gpu]
    compute = flops / (peak * (mm_eff if kind == "mm" else 1.0))
    memory = nbytes / (bandwidth * bw_eff)
    return max(compute, memory)


def table(tokens, d: int, v: int, workspace: int, mm_eff: float, bw_eff: float) -> str:
    lines = [
        f"Model: matmuls at {mm_eff:.0%} of 989.5 TFLOP/s, row passes at {bw_eff:.0%} of HBM bandwidth "
        f"(H100 SXM 3.35 TB/s, H200 4.8 TB/s), D = {d}, V = {v}, bf16, workspace {workspace / 2**20:.0f} MiB.",
        "",
        "| N | phase | GFLOP | GB moved | H100 ms | H200 ms |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    summary = []
    for n in tokens:
        tile, rows = phases(n, d, v, workspace)
        totals = {gpu: {"fwd": 0.0, "all": 0.0} for gpu in GPUS}
        for name, flops, nbytes, kind in rows:
            times = {gpu: predicted_seconds(flops, nbytes, kind, gpu, mm_eff, bw_eff) for gpu in GPUS}
            for gpu, t in times.items():
                totals[gpu]["all"] += t
                if name.startswith("fwd"):
                    totals[gpu]["fwd"] += t
            lines.append(f"| {n} | {name} | {flops / 1e9:,.0f} | {nbytes / 1e9:,.1f} | "
                         f"{times['H100 SXM'] * 1e3:.1f} | {times['H200'] * 1e3:.1f} |")
        ndv = n * d * v
        summary.append(
            f"| {n} | {tile.rows} x {tile.cols} | {extra_memory_bytes(n, d, tile, FP32 + BF16) / 2**20:,.0f} MiB | "
            + " | ".join(
                f"{totals[gpu]['fwd'] * 1e3:.1f} ms ({2 * ndv / totals[gpu]['fwd'] / 989.5e12:.0%}) | "
                f"{totals[gpu]['all'] * 1e3:.1f} ms ({8 * ndv / totals[gpu]['all'] / 989.5e12:.0%})"
                for gpu in GPUS
            ) + " |"
        )
    lines += [
        "",
        "Totals (percent of the 989.5 TFLOP/s bf16 peak on 2NDV for the forward, 8NDV for forward + backward):",
        "",
        "| N | tile (tokens x columns) | extra memory | H100 fwd | H100 fwd+bwd | H200 fwd | H200 fwd+bwd |",
        "|---:|---|---:|---:|---:|---:|---:|",
        *summary,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--workspace-bytes", type=int, default=2**30)
    parser.add_argument("--mm-efficiency", type=float, default=0.78,
                        help="fraction of the bf16 peak cuBLAS reaches (TRL #7244 measured 74%% for an LM head)")
    parser.add_argument("--bandwidth-efficiency", type=float, default=0.85)
    args = parser.parse_args()
    print(table(args.tokens, args.hidden, args.vocab, args.workspace_bytes, args.mm_efficiency,
                args.bandwidth_efficiency))


if __name__ == "__main__":
    main()
