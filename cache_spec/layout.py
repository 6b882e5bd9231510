"""The cache's names and records, declared once for the writer (stage one) and reader (stage two).

SPEC.md is the prose of this module; a test keeps the two in step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import pyarrow as pa

from vitscope.cache_spec.errors import CacheSpecError

SPEC_VERSION = "1.0"
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


def commit_path(cache: Path, shard: str) -> Path:
    return cache / SHARDS_DIR / f"{shard_stem(shard)}.commit.json"


def rows_path(cache: Path, shard: str) -> Path:
    return cache / SHARDS_DIR / f"{shard_stem(shard)}.parquet"


def error_path(cache: Path, shard: str) -> Path:
    return cache / SHARDS_DIR / f"{shard_stem(shard)}.error.json"


@dataclass(frozen=True)
class CacheAttrs:
    """What a cache holds and how; stored as the root group's attrs under `vitscope_cache`."""

    model: str
    """open_clip model name, e.g. 'ViT-L-14'."""
    pretrained: str
    """open_clip pretrained tag, a weights file path, or 'none:seed=S' for seeded random weights."""
    image_size: int
    """Side of the square model input in pixels."""
    n_tokens: int
    """Tokens per image T: CLS at index 0, then patches in raster order."""
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

    def __post_init__(self) -> None:
        if self.storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, not {self.storage!r}")
        if self.rows_per_shard % self.chunk_images:
            raise ValueError(
                f"rows_per_shard ({self.rows_per_shard}) must be a multiple of "
                f"chunk_images ({self.chunk_images})"
            )
        bad = [layer for layer in self.layers if not 0 <= layer < self.n_blocks]
        if bad:
            raise ValueError(
                f"layer(s) {bad} beyond the model: {self.model} has blocks 0..{self.n_blocks - 1}"
            )

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
    def from_json(cls, data: Any, where: Path) -> CacheAttrs:
        return _parse_record(cls, data, where, "cache attributes")


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

    @classmethod
    def from_json(cls, data: Any, where: Path) -> ShardCommit:
        return _parse_record(cls, data, where, "shard commit")


def _parse_record(cls: type, data: Any, where: Path, what: str) -> Any:
    """Build a record field by field, so a bad file gets an error naming the field."""
    if not isinstance(data, dict):
        raise CacheSpecError(where, f"a JSON object with the {what}", type(data).__name__)
    hints = get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        if field.name not in data:
            if field.default is not dataclasses.MISSING:
                continue
            raise CacheSpecError(where, f"{what} field {field.name!r}", "no such field")
        value = data[field.name]
        if isinstance(value, list):
            value = tuple(value)
        if not _has_type(value, hints[field.name]):
            expected = f"{what} field {field.name!r} to be {_type_name(hints[field.name])}"
            raise CacheSpecError(where, expected, repr(value))
        values[field.name] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise CacheSpecError(where, f"valid {what}", str(err)) from None


def _has_type(value: Any, hint: Any) -> bool:
    """isinstance for the few annotations records use: str, int, Literal and tuple[T, ...]."""
    origin = get_origin(hint)
    if origin is Literal:
        return value in get_args(hint)
    if origin is tuple:
        item = get_args(hint)[0]
        return isinstance(value, tuple) and all(_has_type(v, item) for v in value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, get_args(hint)))
    if origin is tuple:
        return f"a list of {_type_name(get_args(hint)[0])}"
    return hint.__name__


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheSpecError(path, "a file", "nothing") from None
    except json.JSONDecodeError as err:
        raise CacheSpecError(path, "JSON", f"unparseable text ({err})") from None


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: readers see all or nothing."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomically(path: Path, data: Any) -> None:
    write_atomically(path, json.dumps(data, indent=2).encode())
