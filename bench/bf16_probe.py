"""How long the CPU's bfloat16 probe (train/kernels.py:bfloat16_is_faster) takes, and whether its
decision matches the truth at the training step's own product shape, in one run.

Each probe runs in a fresh process (the result is cached per process, as in `vitscope train`);
the truth is the fastest of three (512, 1024) @ (1024, 4096) products in each dtype.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from common import command_line, publish

from vitscope.train.kernels import _product_seconds

PROBE = """
import time, torch
from vitscope.train.kernels import bfloat16_is_faster
start = time.perf_counter()
faster = bfloat16_is_faster(torch.device("cpu"))
print(time.perf_counter() - start, faster)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench/results/bf16_probe.md"))
    args = parser.parse_args()
    probes = []
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
        seconds, decision = out.stdout.split()
        probes.append((float(seconds), decision == "True"))
    bf16, fp32 = (
        _product_seconds(dtype, 512, 1024, 4096) for dtype in (torch.bfloat16, torch.float32)
    )
    truth = bf16 < 0.8 * fp32
    body = [
        "| probe run | seconds | decision: bfloat16 faster |",
        "| --- | --- | --- |",
        *[f"| {i} | {s:.3f} | {d} |" for i, (s, d) in enumerate(probes)],
        "",
        f"Truth at 512x1024x4096: bfloat16 {bf16 * 1e3:.1f} ms, float32 {fp32 * 1e3:.1f} ms "
        f"(ratio {bf16 / fp32:.2f}): bfloat16 faster = {truth}; probes agreeing: "
        f"{sum(d == truth for _, d in probes)} of {len(probes)}.",
    ]
    publish(args.out, torch.device("cpu"), command_line(), body)


if __name__ == "__main__":
    main()
