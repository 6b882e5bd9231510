"""Read the images behind cache rows back from their webdataset shards (row -> shard, key).

Each shard's commit record names the folder its tar was read from (spec 1.3), older caches the
first run's folder (`source_shards`, 1.1); `shards` overrides both when they moved. A missing
shard or key is a one-line error naming it and the fix.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from vitscope.cache_spec.store import Cache
from vitscope.pipeline.shards import IMAGE_EXTENSIONS, read_samples
from vitscope.support.errors import MissingInput


class ImageSourceError(MissingInput):
    """A top image cannot be read back: its shard or key is not where the cache says."""


def shard_paths(cache: Cache, shards: Path | None) -> dict[str, Path]:
    """shard file name -> its tar, for every committed shard: in `shards` if given, else in the
    folder its commit record names, else in the one the cache recorded (a cache may have grown
    from shards in several folders)."""
    paths = {}
    for commit in cache.committed.values():
        folder = shards or commit.source_folder or cache.attrs.source_shards
        if folder is None:
            raise ImageSourceError(
                f"{cache.path}: the cache does not record where its shards were read from (spec "
                f"{cache.attrs.spec_version}); pass --shards DIR"
            )
        paths[commit.shard] = Path(folder) / commit.shard
    return paths


def row_sources(
    cache: Cache, rows: Iterable[int] | None = None
) -> dict[int, tuple[str, str, str | None]]:
    """row -> (shard file name, webdataset key, caption) for the given rows (all committed rows
    if None). Filtered in Arrow first: a cache of millions of rows never becomes a Python dict."""
    table = cache.rows_table().select(["row", "shard", "key", "caption"])
    if rows is not None:
        table = table.filter(pc.is_in(table["row"], pa.array(sorted(set(rows)), pa.int64())))
    columns = table.to_pydict()
    return {
        row: (shard, key, caption)
        for row, shard, key, caption in zip(
            columns["row"], columns["shard"], columns["key"], columns["caption"], strict=True
        )
        if row is not None
    }


def iter_images(
    cache: Cache,
    rows: Iterable[int],
    shards: Path | None = None,
    sources: dict[int, tuple[str, str, str | None]] | None = None,
) -> Iterator[tuple[int, Image.Image]]:
    """(row, decoded image) for each row, shard by shard in tar order, one image in memory at a
    time. `sources` (from `row_sources`) saves re-reading the row table when called in batches."""
    paths = shard_paths(cache, shards)
    wanted_rows = set(rows)
    if sources is None:
        sources = row_sources(cache, wanted_rows)
    wanted: dict[str, dict[str, int]] = defaultdict(dict)
    for row in wanted_rows:
        if row not in sources:
            raise ImageSourceError(f"{cache.path}: no committed row {row} in the cache's row table")
        shard, key, _ = sources[row]
        wanted[shard][key] = row
    for shard, keys in sorted(wanted.items()):
        path = paths[shard]
        if not path.is_file():
            raise ImageSourceError(
                f"{path}: shard of {len(keys)} top image(s) not found; pass --shards DIR where "
                "the cache's shards are now"
            )
        found = set()
        for sample in read_samples(path):
            key = sample["__key__"].decode()
            if key in keys:
                data = next(sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample)
                found.add(key)
                yield keys[key], Image.open(io.BytesIO(data)).convert("RGB")
        missing = sorted(set(keys) - found)
        if missing:
            raise ImageSourceError(
                f"{path}: no sample with key {missing[0]} (row {keys[missing[0]]}); the shard "
                "is not the one the cache was made from: pass --shards DIR with the original"
            )


def read_images(
    cache: Cache,
    rows: Iterable[int],
    shards: Path | None = None,
    sources: dict[int, tuple[str, str, str | None]] | None = None,
) -> dict[int, Image.Image]:
    """The decoded image of each row (see `iter_images`), all held at once: for a few images."""
    return dict(iter_images(cache, rows, shards, sources))
