"""The cache's names and records, declared once for the writer (stage one) and reader (stage two).

SPEC.md is the prose of this module; a test keeps the two in step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import pyarrow as pa

from vitscope.cache_spec.errors import CacheSpecError
from vitscope.cache_spec.tokens import TokenLayout
from vitscope.support.errors import BadSetting
from vitscope.support.records import parse_record

SPEC_VERSION = "1.4"
ATTRS_KEY = "vitscope_cache"
SHARDS_DIR = "shards"

Storage = Literal["float16", "float32", "int8", "float8_e4m3"]
STORAGES: tuple[str, ...] = get_args(Storage)

CLIP_SCOPE_LAYERS = (2, 5, 8, 11, 14, 17, 20, 22)
"""The eight residual-stream layers CLIP-Scope trained its SAEs on."""


ROWS_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)
"""Columns of a shard's row table: every sample, used (row set) or skipped (error set)."""


def layer_array_name(layer: int) -> str:
    """Zarr array holding layer `layer`'s residual stream, shape (rows, T, D)."""
    return f"layer_{layer:02d}"


def scale_array_name(layer: int) -> str:
    """Zarr array of per-chunk, per-channel scales for 8-bit storage, shape (rows / C, D)."""
    return f"{layer_array_name(layer)}_scale"


def shard_stem(shard: str) -> str:
    """'00012.tar' -> '00012': the name every per-shard file of the cache is built from."""
    return shard.removesuffix(".tar")


def commit_key(shard: str) -> str:
    """The commit record's key (path inside the cache, '/'-separated, for folders and URLs)."""
    return f"{SHARDS_DIR}/{shard_stem(shard)}.commit.json"


def rows_key(shard: str) -> str:
    return f"{SHARDS_DIR}/{shard_stem(shard)}.parquet"


def error_key(shard: str) -> str:
    return f"{SHARDS_DIR}/{shard_stem(shard)}.error.json"


@dataclass(frozen=True)
class CacheAttrs:
    """What a cache holds and how; stored as the root group's attrs under `vitscope_cache`."""

    model: str
    """open_clip model name, e.g. 'ViT-L-14', or 'timm:NAME' for a timm model."""
    pretrained: str
    """open_clip pretrained tag, a weights file path, or 'none:seed=S' for seeded random weights."""
    image_size: int
    """Side of the square model input in pixels."""
    n_tokens: int
    """Tokens per image T: the prefix tokens, then the patches in raster order (`token_layout`)."""
    d_model: int
    """Residual-stream width D."""
    n_blocks: int
    """Transformer blocks in the vision tower; valid layers are 0 .. n_blocks - 1."""
    layers: tuple[int, ...]
    """Cached layers: layer L is the residual stream after block L (0-indexed)."""
    storage: Storage
    """How values are stored: float16, float32, int8 or float8_e4m3 (8-bit ones with scales)."""
    codec: str
    """Name of the compression preset (cache_spec.codecs.CODECS)."""
    chunk_images: int
    """Images per chunk C: the unit of compression and of stage two's reads."""
    rows_per_shard: int
    """Rows reserved per input shard R, a multiple of C: shard i owns rows [i*R, (i+1)*R)."""
    shards: tuple[str, ...]
    """Input shard file names; a shard's position here is its index."""
    model_dtype: str
    """Dtype the forward pass ran in (float32, bfloat16 or float16)."""
    preprocess: str
    """The open_clip image transform, as printed."""
    spec_version: str = SPEC_VERSION
    """Version of this contract: major.minor; readers refuse another major."""
    source_shards: str | None = None
    """Absolute folder the shards were read from, to read images back (spec 1.1; optional). The
    first run's folder: a shard's commit record names its own (1.3), for caches grown from
    several folders."""
    prefix_tokens: tuple[str, ...] | None = None
    """Names of the tokens before the patches ('cls', 'reg0', ...; spec 1.4). Absent: ('cls',)."""
    patch_grid: tuple[int, ...] | None = None
    """Patch grid (rows, cols) (spec 1.4). Absent: the square grid that T - 1 makes."""

    def __post_init__(self) -> None:
        if self.storage not in STORAGES:
            raise BadSetting(f"storage must be one of {STORAGES}, not {self.storage!r}")
        if self.rows_per_shard % self.chunk_images:
            raise BadSetting(
                f"rows_per_shard ({self.rows_per_shard}) must be a multiple of "
                f"chunk_images ({self.chunk_images})"
            )
        bad = [layer for layer in self.layers if not 0 <= layer < self.n_blocks]
        if bad:
            raise BadSetting(
                f"layer(s) {bad} beyond the model: {self.model} has blocks 0..{self.n_blocks - 1}"
            )
        if self.token_layout.n_tokens != self.n_tokens:
            raise BadSetting(
                f"the token layout ({self.token_layout}) does not make n_tokens = {self.n_tokens}"
            )

    @property
    def token_layout(self) -> TokenLayout:
        """The recorded layout, or for caches before spec 1.4 CLIP's CLS + square grid."""
        if self.patch_grid is None:
            return TokenLayout.legacy(self.n_tokens)
        rows, cols = self.patch_grid
        return TokenLayout(self.prefix_tokens or (), (rows, cols))

    @property
    def capacity(self) -> int:
        """Rows reserved in every layer array: R per known shard."""
        return len(self.shards) * self.rows_per_shard

    def region(self, shard_index: int) -> tuple[int, int]:
        """The rows [start, stop) reserved for one shard."""
        start = shard_index * self.rows_per_shard
        return start, start + self.rows_per_shard

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: Path | str) -> CacheAttrs:
        return parse_record(cls, data, where, "cache attributes", CacheSpecError)


@dataclass(frozen=True)
class ShardCommit:
    """The commit record of one shard: its rows exist once, and only once, this file does."""

    shard: str
    """Input shard file name."""
    index: int
    """Position of the shard in CacheAttrs.shards."""
    first_row: int
    """First row of the shard's region (index * R)."""
    n_rows: int
    """Rows written: images that decoded, in tar order, at first_row .. first_row + n_rows - 1."""
    n_skipped: int
    """Samples that could not be used (listed with their reason in the shard's parquet)."""
    source_bytes: int
    """Size of the input tar when it was read."""
    written_by: str
    """host:pid of the writer."""
    committed_at: str
    """UTC time of the commit, ISO 8601."""
    source_folder: str | None = None
    """Absolute folder this shard's tar was read from (spec 1.3; absent before): a cache grown
    from several shard folders reads each image back from its own."""

    @classmethod
    def from_json(cls, data: Any, where: Path | str) -> ShardCommit:
        return parse_record(cls, data, where, "shard commit", CacheSpecError)
