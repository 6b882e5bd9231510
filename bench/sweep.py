"""A sweep of 4 SAEs on one pass over the cache against 4 separate runs: wall time and bytes read.

Why: a sweep shares every batch, so the cache is read once for all its SAEs. Bytes read are the
process's read() bytes (/proc/self/io rchar), page-cache hits included.

    .venv/bin/python bench/sweep.py
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import publish, write_random_cache

from vitscope.train.config import TrainConfig
from vitscope.train.run import train


def bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar line")


def timed_train(configs: list[TrainConfig]) -> tuple[float, int]:
    start_bytes, start = bytes_read(), time.perf_counter()
    train(configs)
    return time.perf_counter() - start, bytes_read() - start_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=131_072)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results/sweep.md"))
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="vitscope-sweep-bench-"))
    cache = write_random_cache(workdir / "cache", args.images, 16)
    base = TrainConfig(
        cache=str(cache),
        tokens=args.tokens,
        n_latents=args.latents,
        buffer_tokens=2**16,
        heldout_fraction=0.05,
        eval_images=16,
        log_every=args.tokens,
        device=args.device,
    )
    members = [
        dataclasses.replace(base, k=k, lr=lr, out=str(workdir / "sweep" / f"k{k}_lr{lr}"))
        for k in (16, 32)
        for lr in (1e-4, 3e-4)
    ]
    sweep_seconds, sweep_bytes = timed_train(members)
    separate_seconds, separate_bytes = 0.0, 0
    for member in members:
        seconds, read = timed_train([dataclasses.replace(member, out=member.out + "-alone")])
        separate_seconds += seconds
        separate_bytes += read
    command = (
        f"python bench/sweep.py --images {args.images} --latents {args.latents} "
        f"--tokens {args.tokens} --device {args.device}"
    )
    body = [
        "Random float16 cache (T=257, D=1024); 4 SAEs: k 16/32 x lr 1e-4/3e-4.",
        "",
        "| how | wall time (s) | bytes read (MB) |",
        "| --- | --- | --- |",
        f"| one sweep, 4 SAEs sharing every batch | {sweep_seconds:.1f} | {sweep_bytes / 1e6:,.0f} "
        "|",
        f"| 4 separate runs | {separate_seconds:.1f} | {separate_bytes / 1e6:,.0f} |",
        "",
        f"The sweep took {sweep_seconds / separate_seconds:.2f} of the separate runs' time and "
        f"read {sweep_bytes / separate_bytes:.2f} of their bytes.",
    ]
    publish(args.out, torch.device(args.device), command, body)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
