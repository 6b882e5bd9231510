"""Stage one in one process against torchrun with several, on the same shards, alternating.

Issue 13: `torchrun --nproc-per-node N -m vitscope cache` splits the shards between N writers of
one cache. On a GPU node that is one process per GPU; on this CPU machine the ranks share its
cores, so the ratio says what the split itself costs or gains (one process uses every core through
torch's threads; torchrun gives each rank one thread). Wall time of the whole command, model
loading included, over real photos in img2dataset-shaped shards.

    .venv/bin/python bench/parallel_cache.py
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import alternate, command_line, md_table, publish, timed
from photo_shards import write_photo_shards

from vitscope.cache_spec import open_cache


def cache_command(shards: Path, out: Path, args: argparse.Namespace, processes: int) -> list[str]:
    flags = [
        "cache",
        f"--shards={shards}",
        f"--out={out}",
        f"--layers={args.layers}",
        f"--model={args.model}",
        "--pretrained=none",
        "--device=cpu",
        f"--batch-size={args.batch_size}",
        "--num-workers=1",
    ]
    if processes == 1:
        return [sys.executable, "-m", "vitscope", *flags]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, f"--nproc-per-node={processes}", "-m", "vitscope", *flags]


def run_cache(command: list[str], out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(command, check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--layers", default="2,5,8,11")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--processes", type=int, default=2, help="torchrun's ranks")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/parallel_cache.md"))
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="vitscope-parallel-cache-"))
    try:
        shards = write_photo_shards(workdir / "shards", args.images, args.shard_size)
        runs = {}
        for processes in (1, args.processes):
            out = workdir / f"cache{processes}"
            command = cache_command(shards, out, args, processes)
            name = "one process" if processes == 1 else f"torchrun, {processes} ranks"
            runs[name] = lambda c=command, o=out: timed(lambda: run_cache(c, o))
        rounds = alternate(runs, args.repeats)
        rows = open_cache(workdir / f"cache{args.processes}").n_rows
        alone = rounds.median("one process")
        body = [
            f"{args.images} photos in shards of {args.shard_size}, {args.model} (random weights), "
            f"layers {args.layers}, batch {args.batch_size}, one DataLoader worker per process; "
            f"median of {args.repeats} ABBA rounds; {rows} rows in the torchrun cache.",
            "",
            *md_table(
                "run | wall s | images/s | rate vs one process",
                (
                    f"{name} | {rounds.median(name):.1f} | {args.images / rounds.median(name):.1f}"
                    f" | {alone / rounds.median(name):.2f}"
                    for name in runs
                ),
            ),
        ]
        publish(args.out, torch.device("cpu"), command_line(), body)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
