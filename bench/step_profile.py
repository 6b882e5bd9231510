"""Where one SAE training step's time goes: torch.profiler's kernel table for a few steps.

Why: on the H200 TopK's step takes ~16x one bfloat16 encoder product (BENCHMARKS.md, target 3x);
this names the kernels that take the rest. Same SAE and step as bench/train_step.py.

    python bench/step_profile.py --device cuda --architecture topk
"""

from __future__ import annotations

from pathlib import Path

import torch
from common import command_line, publish
from torch.profiler import ProfilerActivity, profile
from train_step import bench_sae, dead_latents, make_step, step_parser


def main() -> None:
    parser = step_parser(__doc__)
    parser.add_argument("--architecture", default="topk")
    parser.add_argument("--selection", default="bfloat16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=20, help="kernels listed")
    parser.add_argument("--out", type=Path, default=Path("bench/results/step_profile.md"))
    args = parser.parse_args()
    device = torch.device(args.device)
    x_BD = torch.randn(args.batch, args.d, generator=torch.Generator().manual_seed(0)) / args.d**0.5
    x_BD = x_BD.to(device)
    dead_F = dead_latents(args, device)
    sae = bench_sae(args, args.architecture, args.selection).to(device)
    step = make_step(sae, False, dead_F, args.k_aux)
    for _ in range(3):
        step(x_BD)  # warm-up: allocations, kernel choice
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step(x_BD)
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60)
    body = [
        f"{args.architecture}, {args.selection} selection, {args.batch:,} tokens, d {args.d}, "
        f"{args.latents:,} latents, k {args.k}, dead share {args.dead:g}; {args.steps} steps "
        f"profiled after 3 warm-up steps, sorted by {key}.",
        "",
        "```",
        table,
        "```",
    ]
    publish(args.out, device, command_line(), body)


if __name__ == "__main__":
    main()
