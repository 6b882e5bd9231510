"""The training loader alone against a plain sequential read of the same files, per codec and
number of readers, alternating in one run (files in the page cache for both).

Issue 12 asks the loader (read, decompress, check, shuffle, batch) for at least half the rate of
a plain read with `--codec none`, and the zstd-1 rate per reader. A random float16 cache of
ViT-L/14's shape (T = 257, D = 1024) is written per codec first. The loader is timed in steady
state: over `--epochs` epochs after `--warm` (its reader processes started and their shared
buffer's pages faulted in, as they are a few seconds into any training run). Two more rows per
codec read every chunk once on one thread, through Zarr and through `Cache.read_chunk` (the
chunk file decoded directly, what each reader process does).

    .venv/bin/python bench/loader_rate.py
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from common import command_line, publish, sequential_read, write_random_cache

from vitscope.cache_spec import Cache, ChunkRef, open_cache
from vitscope.cache_spec.layout import layer_array_name
from vitscope.train.loader import ActivationStream

LAYER = 20


def steady_seconds(stream: ActivationStream, warm: int, epochs: int) -> float:
    """Seconds the loader takes for `epochs` epochs of batches after `warm` epochs."""
    seen, start = 0, 0.0
    for batch in stream.batches(0):
        seen += len(batch.acts_BD)
        if seen <= warm * stream.epoch_tokens:
            start = time.perf_counter()
        elif seen >= (warm + epochs) * stream.epoch_tokens:
            return time.perf_counter() - start
    raise AssertionError("the stream is endless")


def zarr_read(cache: Cache, ref: ChunkRef) -> torch.Tensor:
    """A chunk through Zarr's own read, float16 as stored (what the loader did before issue 12)."""
    stored = cache._array(LAYER)[ref.first_row : ref.first_row + ref.n_rows]
    return cache.encoding.decode(stored, None, torch.float16)


def one_thread_read(cache: Cache, read: Callable[[ChunkRef], torch.Tensor]) -> float:
    """Seconds to read every chunk once, one after another."""
    start = time.perf_counter()
    for ref in cache.chunks():
        read(ref)
    return time.perf_counter() - start


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
    parser.add_argument("--warm", type=int, default=2, help="epochs before the clock starts")
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
                direct = partial(cache.read_chunk, LAYER, dtype=torch.float16)
                for name, read in (("Zarr", partial(zarr_read, cache)), ("chunk file", direct)):
                    took = one_thread_read(cache, read)
                    seconds.setdefault(f"{name} read, 1 thread", []).append(took)
                for readers in map(int, args.readers.split(",")):
                    stream = ActivationStream(cache, LAYER, heldout_fraction=1e-9, readers=readers)
                    took = steady_seconds(stream, args.warm, args.epochs)
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
    command = command_line()
    publish(args.out, torch.device("cpu"), command, body)


if __name__ == "__main__":
    main()
