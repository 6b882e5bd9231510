"""The training loader alone against a plain sequential read of the same files, per codec and
number of readers, alternating in one run (files in the page cache for both).

Issue 12 asks the loader (read, decompress, check, shuffle, batch) for at least half the rate of
a plain read with `--codec none`, and the zstd-1 rate per reader. A random float16 cache of
ViT-L/14's shape (T = 257, D = 1024) is written per codec first. The loader is timed in steady
state: over `--epochs` epochs after `--warm` (its reader processes started and their shared
buffer's pages faulted in, as they are a few seconds into any training run), its time scaled to
the whole layer. Two more rows per codec read every chunk once on one thread, through Zarr and
through `Cache.read_chunk` (the chunk file decoded directly, what each reader process does).
Per codec, all rows alternate in ABBA rounds (`common.alternate`); the fastest round counts.

    .venv/bin/python bench/loader_rate.py
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from common import (
    Timing,
    alternate,
    command_line,
    md_table,
    publish,
    sequential_read,
    take_tokens,
    timed,
    write_random_cache,
)

from vitscope.cache_spec import Cache, ChunkRef, open_cache
from vitscope.cache_spec.layout import layer_array_name
from vitscope.train.loader import ActivationStream

LAYER = 20


def steady_loader(stream: ActivationStream, warm: int, epochs: int) -> Timing:
    """The loader timed over `epochs` epochs of batches after `warm` untimed ones."""
    batches = stream.batches(0)
    take_tokens(batches, warm * stream.epoch_tokens)
    timing = timed(lambda: take_tokens(batches, epochs * stream.epoch_tokens))
    batches.close()  # stops the reader processes
    return timing


def zarr_read(cache: Cache, ref: ChunkRef) -> torch.Tensor:
    """A chunk through Zarr's own read, float16 as stored (what the loader did before issue 12)."""
    stored = cache._array(LAYER)[ref.first_row : ref.first_row + ref.n_rows]
    return cache.encoding.decode(stored, None, torch.float16)


def one_thread_read(cache: Cache, read: Callable[[ChunkRef], torch.Tensor]) -> None:
    """Read every chunk once, one after another."""
    for ref in cache.chunks():
        read(ref)


def codec_rows(path: Path, args: argparse.Namespace) -> list[str]:
    """One codec's rows: GB/s on disk of each way to read the layer, and its share of a plain
    read's rate."""
    cache = open_cache(path, layer=LAYER)
    files = cache.path / layer_array_name(LAYER)
    size = sequential_read(files)  # into the page cache
    runs = {
        "plain read": lambda: timed(partial(sequential_read, files)),
        "Zarr read, 1 thread": lambda: timed(
            partial(one_thread_read, cache, partial(zarr_read, cache))
        ),
        "chunk file read, 1 thread": lambda: timed(
            partial(one_thread_read, cache, partial(cache.read_chunk, LAYER, dtype=torch.float16))
        ),
    }
    share = {name: 1.0 for name in runs}
    total_tokens = sum(ref.n_rows for ref in cache.chunks()) * cache.attrs.n_tokens
    for readers in map(int, args.readers.split(",")):
        stream = ActivationStream(cache, LAYER, heldout_fraction=1e-9, readers=readers)
        name = f"loader, {readers} reader(s)"
        runs[name] = partial(steady_loader, stream, args.warm, args.epochs)
        share[name] = args.epochs * stream.epoch_tokens / total_tokens  # 1 chunk held out
    rounds = alternate(runs, args.repeats)
    best = {
        name: min(t.wall for t in found) / share[name] for name, found in rounds.timings.items()
    }
    return [
        f"{cache.attrs.codec} | {name} | {size / seconds / 1e9:.2f} | "
        f"{best['plain read'] / seconds:.2f}"
        for name, seconds in best.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512, help="images per written cache")
    parser.add_argument("--codecs", default="none,zstd-1")
    parser.add_argument("--readers", default="1,2,4", help="reader counts to measure")
    parser.add_argument("--repeats", type=int, default=3, help="ABBA rounds (best is kept)")
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
    rows = []
    with tempfile.TemporaryDirectory(prefix="vitscope-loader-bench-") as workdir:
        for codec in args.codecs.split(","):
            path = write_random_cache(Path(workdir) / codec, args.images, 16, LAYER, codec)
            rows += codec_rows(path, args)
    body = [
        f"{args.images} images x 257 tokens x 1024 float16 per cache, chunks of 16 images; "
        f"best of {args.repeats} ABBA rounds; torch threads {torch.get_num_threads()}.",
        "",
        *md_table("codec | reader | GB/s on disk | of a plain read", rows),
    ]
    publish(args.out, torch.device("cpu"), command_line(), body)


if __name__ == "__main__":
    main()
