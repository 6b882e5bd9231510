"""The training loader alone against a plain sequential read of the same files, per codec and
number of readers, alternating in one run (files in the page cache for both).

Issue 12 asks the loader (read, decompress, check, shuffle, batch) for at least half the rate of
a plain read with `--codec none`, and the zstd-1 rate per reader. A random float16 cache of
ViT-L/14's shape (T = 257, D = 1024) is written per codec first.

    .venv/bin/python bench/loader_rate.py
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from common import loader_rate, publish, sequential_read, write_random_cache

from vitscope.cache_spec import open_cache
from vitscope.cache_spec.layout import layer_array_name
from vitscope.train.loader import ActivationStream

LAYER = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512, help="images per written cache")
    parser.add_argument("--codecs", default="none,zstd-1")
    parser.add_argument("--readers", default="1,2,4", help="reader counts to measure")
    parser.add_argument("--repeats", type=int, default=3, help="alternations (best is kept)")
    parser.add_argument(
        "--epochs",
        type=int,
        default=4,
        help="epochs per loader measurement (its read-ahead "
        "of the next windows makes a single epoch read up to 3 windows for 1)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/loader_rate.md"))
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="vitscope-loader-bench-"))
    rows = ["| codec | reader | GB/s on disk | of a plain read |", "| --- | --- | --- | --- |"]
    try:
        for codec in args.codecs.split(","):
            path = write_random_cache(workdir / codec, args.images, 16, LAYER, codec)
            cache = open_cache(path, layer=LAYER)
            files = cache.path / layer_array_name(LAYER)
            total_tokens = sum(ref.n_rows for ref in cache.chunks()) * cache.attrs.n_tokens
            sequential_read(files)  # into the page cache
            seconds: dict[str, list[float]] = {}
            for _ in range(args.repeats):
                size, plain = sequential_read(files)
                seconds.setdefault("plain read", []).append(plain)
                for readers in map(int, args.readers.split(",")):
                    stream = ActivationStream(
                        cache, LAYER, heldout_fraction=1e-9, readers=readers
                    )
                    _, took = loader_rate(stream, args.epochs * stream.epoch_tokens)
                    share = args.epochs * stream.epoch_tokens / total_tokens  # 1 chunk held out
                    seconds.setdefault(f"loader, {readers} reader(s)", []).append(took / share)
            best_plain = min(seconds["plain read"])
            for what, values in seconds.items():
                rows.append(
                    f"| {codec} | {what} | {size / min(values) / 1e9:.2f} | "
                    f"{best_plain / min(values):.2f} |"
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    body = [
        f"{args.images} images x 257 tokens x 1024 float16 per cache, chunks of 16 images; "
        f"best of {args.repeats} alternations; torch threads {torch.get_num_threads()}.",
        "",
        *rows,
    ]
    command = "python bench/loader_rate.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k != "out"
    )
    publish(args.out, torch.device("cpu"), command, body)


if __name__ == "__main__":
    main()
