"""Read the images behind cache rows back from their webdataset shards (row -> shard, key).

The cache records where its shards were read from (`source_shards`, spec 1.1); `shards` overrides
it when they moved. A missing shard or key is a one-line error naming it and the fix.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from vitscope.cache_spec.store import Cache
from vitscope.pipeline.shards import IMAGE_EXTENSIONS, read_samples


class ImageSourceError(Exception):
    """A top image cannot be read back: its shard or key is not where the cache says."""


def shards_folder(cache: Cache, shards: Path | None) -> Path:
    """Where the cache's shards are: `shards` if given, else the folder the cache recorded."""
    if shards is not None:
        return shards
    if cache.attrs.source_shards is None:
        raise ImageSourceError(
            f"{cache.path}: the cache does not record where its shards were read from (spec "
            f"{cache.attrs.spec_version}); pass --shards DIR"
        )
    return Path(cache.attrs.source_shards)


def row_sources(cache: Cache) -> dict[int, tuple[str, str, str | None]]:
    """row -> (shard file name, webdataset key, caption) for every committed row."""
    table = cache.rows_table().to_pydict()
    return {
        row: (shard, key, caption)
        for row, shard, key, caption in zip(
            table["row"], table["shard"], table["key"], table["caption"], strict=True
        )
        if row is not None
    }


def read_images(
    cache: Cache, rows: Iterable[int], shards: Path | None = None
) -> dict[int, Image.Image]:
    """The decoded image of each row, reading each shard once, in tar order."""
    folder = shards_folder(cache, shards)
    sources = row_sources(cache)
    wanted: dict[str, dict[str, int]] = defaultdict(dict)
    for row in set(rows):
        shard, key, _ = sources[row]
        wanted[shard][key] = row
    images: dict[int, Image.Image] = {}
    for shard, keys in sorted(wanted.items()):
        path = folder / shard
        if not path.is_file():
            raise ImageSourceError(
                f"{path}: shard of {len(keys)} top image(s) not found; pass --shards DIR where "
                "the cache's shards are now"
            )
        for sample in read_samples(path):
            row = keys.get(sample["__key__"].decode())
            if row is not None:
                data = next(sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample)
                images[row] = Image.open(io.BytesIO(data)).convert("RGB")
        missing = sorted(set(keys) - {k for k, r in keys.items() if r in images})
        if missing:
            raise ImageSourceError(
                f"{path}: no sample with key {missing[0]} (row {keys[missing[0]]}); the shard "
                "is not the one the cache was made from: pass --shards DIR with the original"
            )
    return images
