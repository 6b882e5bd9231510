"""`vitscope cache-info`: what a cache holds, how complete it is, and what it costs on disk; its
settings."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Annotated

import pyarrow.compute as pc

from vitscope.cache_spec.layout import layer_array_name
from vitscope.cache_spec.outliers import SAMPLE_CHUNKS
from vitscope.cache_spec.store import Cache
from vitscope.support.configs import AtLeast, check_bounds
from vitscope.support.shared_options import Overwrite


def summary_lines(cache: Cache) -> list[str]:
    """A human summary; every number is read from the cache itself."""
    attrs = cache.attrs
    commits = cache.committed
    rows = cache.rows_table()
    skipped = Counter(
        error.split(":")[0]
        for error in rows.filter(pc.equal(rows["status"], "skipped"))["error"].to_pylist()
    )
    stored_per_row = attrs.n_tokens * attrs.d_model * cache.encoding.bytes_per_value
    chunks = len(cache.chunks())
    lines = [
        f"cache {cache.path} (spec {attrs.spec_version}, zarr v3)",
        f"model {attrs.model}, weights {attrs.pretrained}, {attrs.image_size}px, "
        f"forward in {attrs.model_dtype}",
        f"tokens T={attrs.n_tokens} (CLS at 0), d_model D={attrs.d_model}, "
        f"layers {', '.join(map(str, attrs.layers))} of blocks 0..{attrs.n_blocks - 1}",
        f"storage {attrs.storage}, codec {attrs.codec}, {attrs.chunk_images} images per chunk, "
        f"{attrs.rows_per_shard} rows reserved per shard",
        f"shards: {len(commits)} of {len(attrs.shards)} committed; rows: {cache.n_rows} "
        f"in {chunks} chunks; skipped images: {sum(skipped.values())}",
    ]
    lines += [f"  skipped {n}: {reason}" for reason, n in skipped.most_common()]
    uncommitted = cache.uncommitted_shards()
    errors = cache.errors()
    if uncommitted:
        lines.append(
            f"uncommitted shards: {len(uncommitted)} (being written, interrupted or failed; "
            "`vitscope cache` resumes them)"
        )
        lines += [f"  failed {shard}: {error}" for shard, error in errors.items()]
    for layer in attrs.layers:
        on_disk = cache.location.size(layer_array_name(layer))
        raw = chunks * attrs.chunk_images * stored_per_row
        ratio = raw / on_disk if on_disk else 0.0
        lines.append(
            f"  {layer_array_name(layer)}: {on_disk / 1e6:.1f} MB on disk, "
            f"{on_disk / max(cache.n_rows * attrs.n_tokens * attrs.d_model, 1):.3f} bytes/value, "
            f"compression {ratio:.2f}x"
        )
    return lines


@dataclass(frozen=True)
class CacheInfoConfig(Overwrite):
    """What `vitscope cache-info` reports on."""

    path: str
    """The cache folder, or its URL (s3://...)."""
    plot: str = ""
    """Also draw token norms (by position, their distribution, where the outliers sit) into
    this PNG; empty = no picture."""
    sample_chunks: Annotated[int, AtLeast(0)] = SAMPLE_CHUNKS
    """Chunks per layer, spread evenly over the cache, read for gamma = |mean| / |std| and the
    token-norm statistics (outlier tokens: above 10x the median norm); 0 = skip them."""
    verify: bool = False
    """Read every committed chunk of every layer and name the damaged ones (exit 1 if any)."""

    def __post_init__(self) -> None:
        check_bounds(self)
