"""A sweep of 4 SAEs on one pass over the cache against 4 separate runs: wall time and bytes read.

Why: a sweep shares every batch, so the cache is read once for all its SAEs. Bytes read are the
process's read() bytes (/proc/self/io rchar), page-cache hits included. The sweep and the
separate runs are timed in one round (`common.alternate`).

    .venv/bin/python bench/sweep.py
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch
from common import Timing, alternate, command_line, md_table, publish, timed, write_random_cache

from vitscope.train.config import TrainConfig
from vitscope.train.run import train

SWEEP, SEPARATE = "one sweep, 4 SAEs sharing every batch", "4 separate runs"


def bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar line")


def train_runs(runs: list[list[TrainConfig]], device: torch.device) -> Timing:
    """Each list of configs trained as one sweep, one after another; result: the bytes read."""
    before = bytes_read()
    timing = timed(lambda: [train(configs) for configs in runs], device)
    return dataclasses.replace(timing, result=bytes_read() - before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=131_072)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results/sweep.md"))
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="vitscope-sweep-bench-") as tmp:
        workdir = Path(tmp)
        base = TrainConfig(
            cache=str(write_random_cache(workdir / "cache", args.images, 16)),
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
        alone = [[dataclasses.replace(m, out=m.out + "-alone")] for m in members]
        runs = {
            SWEEP: lambda: train_runs([members], device),
            SEPARATE: lambda: train_runs(alone, device),
        }
        timings = {name: found[0] for name, found in alternate(runs, 1).timings.items()}
    sweep, separate = timings[SWEEP], timings[SEPARATE]
    body = [
        "Random float16 cache (T=257, D=1024); 4 SAEs: k 16/32 x lr 1e-4/3e-4.",
        "",
        *md_table(
            "how | wall time (s) | bytes read (MB)",
            (f"{name} | {t.wall:.1f} | {t.result / 1e6:,.0f}" for name, t in timings.items()),
        ),
        "",
        f"The sweep took {sweep.wall / separate.wall:.2f} of the separate runs' time and "
        f"read {sweep.result / separate.result:.2f} of their bytes.",
    ]
    publish(args.out, device, command_line(), body)


if __name__ == "__main__":
    main()
