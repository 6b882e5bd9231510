"""The S3 path against the local disk path, for writing a cache and for the training loader, and
which object layout pays on S3: C = 16, a larger C, or Zarr's sharding codec.

The store is moto's S3 server on 127.0.0.1 in its own process (`support/loopback_s3.py`): the
requests of AWS over loopback HTTP, so the ratios price the request path (HTTP, signing, one
object per chunk, moto's Python server) and not a WAN; a real bucket adds ~10-30 ms of first-byte
latency per request and more bandwidth per connection. Caches are ViT-L/14-shaped float16
(T = 257, D = 1024) random values written with `--codec none`, so compression is not timed;
writes time `create_or_open`, every chunk's put and the commit; the loader is timed in steady
state as in `loader_rate.py`. Local and S3 runs alternate in ABBA rounds (`common.alternate`).

The layout rows write raw Zarr arrays of the same shape to S3 and read them back in units of
16 rows (the loader's unit at C = 16) and of whole objects: one object per chunk (the spec's
layout), one per 64 rows, or shards of 256 rows holding 16-row inner chunks (a 16-row read is
then ranged GETs of the shard's index and the inner chunk).

    .venv/bin/python bench/object_storage.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

import fsspec
import numpy as np
import torch
import zarr
from common import Timing, alternate, command_line, md_table, publish, timed
from common import write_single_shard_cache as write_cache
from loader_rate import steady_loader

from vitscope.cache_spec import open_cache
from vitscope.support.loopback_s3 import s3_environment, serve_s3
from vitscope.train.loader import ActivationStream

LAYER, T, D, C = 20, 257, 1024, 16
CLIP_SCOPE_IMAGES = 4_500_000
LAYOUTS = {
    "C = 16, one object per chunk (SPEC.md)": dict(chunks=(16, T, D)),
    "C = 64, one object per chunk": dict(chunks=(64, T, D)),
    "sharding codec: 256-row shards of C = 16": dict(chunks=(16, T, D), shards=(256, T, D)),
}


def timed_write(
    destination: Callable[[], str], chunks: list[torch.Tensor], n_images: int
) -> Timing:
    """One cache written from scratch to a fresh destination, then removed."""
    where = destination()
    timing = timed(lambda: write_cache(where, chunks, n_images, C, LAYER, "float16", "none"))
    remove(where)
    return timing


def remove(where: str) -> None:
    if "://" in where:
        fsspec.filesystem("s3").rm(where.removeprefix("s3://"), recursive=True)
    else:
        shutil.rmtree(where)


def write_rows(args: argparse.Namespace, workdir: Path, bucket: str) -> list[str]:
    """Rows of write and loader rates, local disk against S3, and their ratio."""
    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randn(C, T, D, generator=generator) for _ in range(args.images // C)]
    fresh = {
        "local disk": lambda: str(workdir / uuid.uuid4().hex),
        "S3 (moto, loopback)": lambda: f"{bucket}/{uuid.uuid4().hex}",
    }
    writes = alternate(
        {name: partial(timed_write, make, chunks, args.images) for name, make in fresh.items()},
        args.repeats,
    )
    caches = {name: make() for name, make in fresh.items()}
    for where in caches.values():
        write_cache(where, chunks, args.images, C, LAYER, "float16", "none")
    nbytes = args.images * T * D * 2
    measured = [("write", writes, nbytes)]
    read_bytes = nbytes * (args.images - C) / args.images * args.epochs  # 1 chunk held out
    for readers in map(int, args.readers.split(",")):
        loads = {}
        for name, where in caches.items():
            stream = ActivationStream(
                open_cache(where), LAYER, heldout_fraction=1e-9, readers=readers
            )
            loads[name] = partial(steady_loader, stream, args.warm, args.epochs)
        rounds = alternate(loads, args.repeats)
        measured.append((f"loader, {readers} reader(s)", rounds, read_bytes))
    rows = []
    for what, rounds, read_bytes in measured:
        best = {name: min(t.wall for t in rounds.timings[name]) for name in fresh}
        for name, seconds in best.items():
            rows.append(
                f"{what} | {name} | {read_bytes / seconds / 1e6:.0f} | "
                f"{best['local disk'] / seconds:.2f}"
            )
    return rows


def request_costs(bucket: str, repeats: int = 50) -> str:
    """Median wall time of one GET of a 4 KB object and of one C = 16 chunk's 8.4 MB."""
    fs = fsspec.filesystem("s3")
    parts = []
    for label, size in [("4 KB", 4096), ("8.4 MB (one C = 16 chunk)", C * T * D * 2)]:
        key = f"{bucket.removeprefix('s3://')}/request-{size}"
        fs.pipe_file(key, os.urandom(size))
        seconds = sorted(timed(partial(fs.cat_file, key)).wall for _ in range(repeats))
        parts.append(f"{label}: {seconds[repeats // 2] * 1e3:.1f} ms")
    return "One GET of an object, median of 50: " + "; ".join(parts) + "."


def layout_rows(args: argparse.Namespace, bucket: str) -> list[str]:
    """Per layout: objects per layer at CLIP-Scope's size, and write and 16-row read rates."""
    generator = np.random.default_rng(0)
    values = generator.standard_normal((args.images, T, D), dtype=np.float32).astype(np.float16)
    nbytes = values.nbytes
    rows = []
    for label, layout in LAYOUTS.items():
        per_object = layout.get("shards", layout["chunks"])[0]
        url = f"{bucket}/layout-{uuid.uuid4().hex}"
        array = zarr.create_array(
            url, shape=values.shape, dtype="float16", compressors=None, fill_value=0, **layout
        )

        def write(array: zarr.Array = array) -> Timing:
            return timed(lambda: array.__setitem__(slice(None), values))

        def read(rows: int, array: zarr.Array = array) -> Timing:
            return timed(lambda: [array[i : i + rows] for i in range(0, args.images, rows)])

        runs = {"write": write, "whole": partial(read, per_object), "16 rows": partial(read, C)}
        rounds = alternate(runs, args.repeats)
        rate = {k: nbytes / min(t.wall for t in v) / 1e6 for k, v in rounds.timings.items()}
        rows.append(
            f"{label} | {CLIP_SCOPE_IMAGES // per_object:,} | {rate['write']:.0f} | "
            f"{rate['whole']:.0f} | {rate['16 rows']:.0f}"
        )
        remove(url)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256, help="images per written cache")
    parser.add_argument("--readers", default="1,4", help="loader reader processes to measure")
    parser.add_argument("--repeats", type=int, default=3, help="ABBA rounds (best is kept)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per loader measurement")
    parser.add_argument("--warm", type=int, default=1, help="epochs before the clock starts")
    parser.add_argument("--out", type=Path, default=Path("bench/results/object_storage.md"))
    args = parser.parse_args()
    with serve_s3() as endpoint, tempfile.TemporaryDirectory(prefix="vitscope-s3-") as workdir:
        os.environ.update(s3_environment(endpoint))
        bucket = "s3://vitscope-bench"
        fsspec.filesystem("s3").mkdir(bucket.removeprefix("s3://"))
        rates = write_rows(args, Path(workdir), bucket)
        layouts = layout_rows(args, bucket)
        requests = request_costs(bucket)
    mb = args.images * T * D * 2 / 1e6
    body = [
        f"{args.images} images x {T} tokens x {D} float16 ({mb:.0f} MB), C = {C}, codec none; "
        f"best of {args.repeats} ABBA rounds; torch threads {torch.get_num_threads()}. " + requests,
        "",
        *md_table("path | store | MB/s | of local disk", rates),
        "",
        "Object layout on the S3 path (raw Zarr arrays, one thread; reads of whole objects, and "
        "of 16-row units, the loader's unit at C = 16):",
        "",
        *md_table(
            "layout | objects per layer at 4.5 M images | write MB/s | read MB/s, whole objects | "
            "read MB/s, 16 rows",
            layouts,
        ),
    ]
    publish(args.out, torch.device("cpu"), command_line(), body)


if __name__ == "__main__":
    main()
