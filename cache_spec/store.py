"""Open, create and validate a cache; write a shard's chunks and commit it; read chunks and rows.

Stage one writes only through `Cache.write_chunk` and `Cache.commit`; stage two reads only through
`Cache.chunks`, `Cache.read_chunk` and `Cache.read_rows`. Everything a reader sees comes from
committed shards, so a cache being written, or left half-written by a killed run, never exposes
a row that is not whole in every layer.
"""

from __future__ import annotations

import dataclasses
import io
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr

from vitscope.cache_spec.chunk_files import ChunkFile, chunk_decoder, read_chunk_file
from vitscope.cache_spec.codecs import compressors
from vitscope.cache_spec.errors import CacheSpecError
from vitscope.cache_spec.layout import (
    ATTRS_KEY,
    ROWS_SCHEMA,
    SHARDS_DIR,
    SPEC_VERSION,
    CacheAttrs,
    ShardCommit,
    commit_key,
    error_key,
    layer_array_name,
    rows_key,
    scale_array_name,
)
from vitscope.cache_spec.location import (
    ROOT_META,
    LocalFolder,
    ObjectStore,
    location_of,
    put_json,
    read_json,
)
from vitscope.cache_spec.storage import ENCODINGS, Encoding
from vitscope.support.errors import BadSetting

COMPATIBLE_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(CacheAttrs)
    if f.name not in ("shards", "spec_version", "source_shards", "prefix_tokens", "patch_grid")
)
"""Settings every run writing into one cache must share (shards may grow; see `create_or_open`);
the token layout too, compared as `token_layout` so that a cache written before spec 1.4 (which
records none) resumes under a run that records CLS + the same square grid."""


@dataclass(frozen=True)
class ChunkRef:
    """One stored chunk of committed rows: stage two's unit of reading."""

    index: int
    """Chunk index along the row axis (rows index*C .. index*C + C - 1)."""
    first_row: int
    n_rows: int
    """Committed rows in the chunk; the tail chunk of a shard holds fewer than C."""
    shard_index: int


class Cache:
    """A validated cache in a folder or on an object store."""

    def __init__(self, location: LocalFolder | ObjectStore, attrs: CacheAttrs) -> None:
        self.location = location
        self.path: Path | str = location.path
        """The folder (a Path) or the URL (a str): for messages, and for local tools."""
        self.attrs = attrs
        self.encoding: Encoding = ENCODINGS[attrs.storage]
        self._group = zarr.open_group(location.zarr_store(), mode="r+")
        self._arrays: dict[str, zarr.Array] = {}

    # ----------------------------------------------------------------- state
    def commits(self) -> dict[int, ShardCommit]:
        """Committed shards by index, from one fresh listing (other writers may have committed)."""
        found = {}
        keys = self.location.keys(SHARDS_DIR)
        for index, shard in enumerate(self.attrs.shards):
            if commit_key(shard) in keys:
                found[index] = self._validated_commit(keys, index, shard)
        return found

    @cached_property
    def committed(self) -> dict[int, ShardCommit]:
        """Commits as of the first look: a reader's fixed view of the cache."""
        return self.commits()

    @property
    def n_rows(self) -> int:
        return sum(c.n_rows for c in self.committed.values())

    def uncommitted_shards(self) -> list[str]:
        return [s for i, s in enumerate(self.attrs.shards) if i not in self.committed]

    # --------------------------------------------------------------- reading
    def chunks(self, order: str = "sequential", seed: int = 0) -> list[ChunkRef]:
        """Chunks of committed rows, in row order or in a permutation that is a function of seed."""
        refs = []
        per_chunk = self.attrs.chunk_images
        for index, commit in sorted(self.committed.items()):
            for offset in range(0, commit.n_rows, per_chunk):
                first = commit.first_row + offset
                n = min(per_chunk, commit.n_rows - offset)
                refs.append(ChunkRef(first // per_chunk, first, n, index))
        if order == "random":
            permutation = np.random.default_rng(seed).permutation(len(refs))
            refs = [refs[i] for i in permutation]
        elif order != "sequential":
            raise BadSetting(f"order must be 'sequential' or 'random', not {order!r}")
        return refs

    def read_chunk(
        self, layer: int, ref: ChunkRef, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The committed rows of one chunk, shape (n_rows, T, D), float32 unless asked otherwise."""
        file = self.chunk_file(layer, ref)
        chunk_NTD = torch.empty(file.shape, dtype=dtype)
        read_chunk_file(file, chunk_NTD)
        return chunk_NTD

    def chunk_file(self, layer: int, ref: ChunkRef) -> ChunkFile:
        """Where one chunk of committed rows is stored, for `read_chunk_file` (in any process)."""
        array = self._array(layer)
        scale_path = None
        if self.encoding.scaled:
            scales = self._array(layer, scale=True)
            key = scales.metadata.encode_chunk_key((ref.index, 0))
            scale_path = self.location.url(f"{scales.path}/{key}")
        key = array.metadata.encode_chunk_key((ref.index, 0, 0))
        return ChunkFile(
            path=self.location.url(f"{array.path}/{key}"),
            decoder=chunk_decoder(array.metadata.codecs),
            storage=self.attrs.storage,
            shape=(ref.n_rows, self.attrs.n_tokens, self.attrs.d_model),
            chunk_rows=self.attrs.chunk_images,
            scale_path=scale_path,
            rows=(ref.first_row, ref.first_row + ref.n_rows - 1),
            layer=layer,
            shard=self.attrs.shards[ref.shard_index],
        )

    def read_rows(self, layer: int, rows: Sequence[int]) -> torch.Tensor:
        """Arbitrary committed rows, in the order given, as float32 (len(rows), T, D); each
        chunk holding one is read whole through `read_chunk`, so damage is named as there."""
        rows_N = np.asarray(rows, dtype=np.int64)
        self._check_committed(rows_N)
        per_chunk = self.attrs.chunk_images
        refs = {ref.index: ref for ref in self.chunks()}
        wanted = np.unique(rows_N // per_chunk)
        chunks = [self.read_chunk(layer, refs[index]) for index in wanted.tolist()]
        if not chunks:
            return torch.empty(0, self.attrs.n_tokens, self.attrs.d_model)
        starts = np.cumsum([0, *(len(chunk) for chunk in chunks[:-1])])
        at = starts[np.searchsorted(wanted, rows_N // per_chunk)] + rows_N % per_chunk
        return torch.cat(chunks)[torch.from_numpy(at)]

    def rows_table(self) -> pa.Table:
        """Every committed sample (used or skipped) with its row, shard, key, url and caption."""
        tables = [
            pq.read_table(pa.BufferReader(self.location.read(rows_key(c.shard))))
            for c in self.committed.values()
        ]
        return pa.concat_tables(tables) if tables else ROWS_SCHEMA.empty_table()

    # --------------------------------------------------------------- writing
    def write_chunk(self, layer: int, chunk_index: int, acts_CTD: torch.Tensor) -> int:
        """Encode and store one whole chunk (pad a shard's tail chunk to C rows); returns bytes."""
        return self.write_encoded(layer, chunk_index, *self.encoding.encode(acts_CTD))

    def write_encoded(
        self, layer: int, chunk_index: int, stored: np.ndarray, scale_D: np.ndarray | None
    ) -> int:
        """Store a chunk already encoded (`encoding.encode`): the part that may run in a thread."""
        first = chunk_index * self.attrs.chunk_images
        self._array(layer)[first : first + self.attrs.chunk_images] = stored
        if scale_D is not None:
            self._array(layer, scale=True)[chunk_index] = scale_D
        return stored.nbytes

    def commit(self, commit: ShardCommit, rows: pa.Table) -> None:
        """Make a shard's rows visible: its row table first, the commit record last, atomically."""
        buffer = io.BytesIO()
        pq.write_table(rows, buffer)
        self.location.put(rows_key(commit.shard), buffer.getvalue())
        put_json(self.location, commit_key(commit.shard), dataclasses.asdict(commit))
        self.location.remove(error_key(commit.shard))

    def record_error(self, shard: str, message: str) -> None:
        """Note why a shard was not committed; the next run retries it and removes the note."""
        put_json(self.location, error_key(shard), {"shard": shard, "error": message})

    def errors(self) -> dict[str, str]:
        """Shards whose last attempt failed, with the reason."""
        keys = self.location.keys(SHARDS_DIR)
        return {
            shard: read_json(self.location, error_key(shard)).get("error", "?")
            for shard in self.uncommitted_shards()
            if error_key(shard) in keys
        }

    # -------------------------------------------------------------- internals
    def _array(self, layer: int, scale: bool = False) -> zarr.Array:
        name = scale_array_name(layer) if scale else layer_array_name(layer)
        if name not in self._arrays:
            array = self._group[name]
            assert isinstance(array, zarr.Array)
            # Dense activations are never all-zero: skip zarr's per-chunk emptiness check (2-3x).
            self._arrays[name] = array.with_config({"write_empty_chunks": True})
        return self._arrays[name]

    def _check_committed(self, rows_N: np.ndarray) -> None:
        valid = np.zeros(len(rows_N), dtype=bool)
        for commit in self.committed.values():
            valid |= (rows_N >= commit.first_row) & (rows_N < commit.first_row + commit.n_rows)
        if not valid.all():
            raise IndexError(
                f"{self.path}: row {int(rows_N[~valid][0])} is not a committed row; "
                "rows_table() lists the committed ones"
            )

    def _validated_commit(self, keys: set[str], index: int, shard: str) -> ShardCommit:
        path = self.location.url(commit_key(shard))
        commit = ShardCommit.from_json(read_json(self.location, commit_key(shard)), path)
        start, stop = self.attrs.region(index)
        if commit.shard != shard or commit.first_row != start or commit.n_rows > stop - start:
            raise CacheSpecError(
                path,
                f"shard {shard!r} in rows {start}..{stop - 1}",
                f"shard {commit.shard!r} at row {commit.first_row} with {commit.n_rows} rows",
                fix="delete the record and re-run `vitscope cache` to rewrite the shard",
            )
        if rows_key(shard) not in keys:
            raise CacheSpecError(
                self.location.url(rows_key(shard)),
                "the row table of a committed shard",
                "no file",
                fix=f"delete {commit_key(shard)} and re-run `vitscope cache` to rewrite the shard",
            )
        return commit


def open_cache(path: Path | str, layer: int | None = None) -> Cache:
    """Open and validate a cache; with `layer`, also require that layer to be cached."""
    location = location_of(path)
    attrs = _read_attrs(location)
    cache = Cache(location, attrs)
    for cached_layer in attrs.layers:
        _validate_arrays(cache, cached_layer)
    if layer is not None and layer not in attrs.layers:
        raise CacheSpecError(
            path,
            f"layer {layer}",
            f"layers {', '.join(map(str, attrs.layers))}",
            fix=f"cache it with `vitscope cache --layers ...,{layer}` into a new --out",
        )
    cache.committed  # noqa: B018 - validates every commit record now, not at first read
    return cache


def check_cache_destination(path: Path | str) -> None:
    """Refuse, before any heavy work, an output path that can be neither created nor resumed."""
    location = location_of(path)
    if isinstance(location, ObjectStore):
        if location.exists() and not location.exists(ROOT_META):
            raise CacheSpecError(
                location.path,
                "a new or empty prefix, or a cache to resume",
                "objects but no zarr.json (other data, or a creation that was killed)",
                "choose another --out, or delete the prefix",
            )
        return
    path = location.path
    if path.is_file():
        raise CacheSpecError(
            path,
            "a folder for the cache (new, or a cache to resume)",
            "a file",
            "choose another --out",
        )
    if path.is_dir() and not (path / "zarr.json").exists() and any(path.iterdir()):
        raise CacheSpecError(
            path,
            "a new or empty folder, or a cache to resume",
            "a folder of other files (no zarr.json)",
            "choose another --out",
        )
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise CacheSpecError(
            path, "a writable place for the cache", f"{parent} not writable", "choose another --out"
        )


def create_or_open(path: Path | str, attrs: CacheAttrs) -> Cache:
    """Create the cache atomically, or open an existing one that was written with the same settings.

    Many writers may call this at once: the first rename (or root put) wins and the others open
    its result. Shards not yet known to an existing cache are appended under a lock (SPEC.md).
    """
    location = location_of(path)
    if not location.exists(ROOT_META):
        location.create(lambda staging: _build(staging, attrs))
    existing = _read_attrs(location)
    _check_compatible(location.path, existing, attrs)
    if set(attrs.shards) - set(existing.shards):
        _append_shards(location, attrs.shards)
    return open_cache(location.path)


def writer_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _build(path: Path, attrs: CacheAttrs) -> None:
    group = zarr.open_group(path, mode="w", attributes={ATTRS_KEY: attrs.to_json()})
    encoding = ENCODINGS[attrs.storage]
    for layer in attrs.layers:
        group.create_array(
            layer_array_name(layer),
            shape=(attrs.capacity, attrs.n_tokens, attrs.d_model),
            chunks=(attrs.chunk_images, attrs.n_tokens, attrs.d_model),
            dtype=encoding.zarr_dtype,
            compressors=compressors(attrs.codec),
            fill_value=0,
            dimension_names=("row", "token", "channel"),
        )
        if encoding.scaled:
            group.create_array(
                scale_array_name(layer),
                shape=(attrs.capacity // attrs.chunk_images, attrs.d_model),
                chunks=(1, attrs.d_model),
                dtype="float32",
                compressors=None,
                fill_value=0,
                dimension_names=("chunk", "channel"),
            )
    group.create_group(SHARDS_DIR, attributes={"about": "row tables and commit records, SPEC.md"})


def _read_attrs(location: LocalFolder | ObjectStore) -> CacheAttrs:
    meta = location.url(ROOT_META)
    if not location.exists(ROOT_META):
        fix = "pass an existing cache, or create one with `vitscope cache --out PATH`"
        if isinstance(location, LocalFolder) and location.path.is_file():
            what, fix = "a file", "pass the cache's folder (the one holding zarr.json)"
        else:
            what = "no zarr.json" if location.exists() else "no such directory"
        raise CacheSpecError(location.path, "a vitscope cache", what, fix=fix)
    data = read_json(location, ROOT_META).get("attributes", {}).get(ATTRS_KEY)
    if data is None:
        raise CacheSpecError(meta, f"attributes[{ATTRS_KEY!r}]", "none: not a vitscope cache")
    version = str(data.get("spec_version", "?"))
    if version.split(".")[0] != SPEC_VERSION.split(".")[0]:
        raise CacheSpecError(
            meta,
            f"spec version {SPEC_VERSION.split('.')[0]}.x",
            f"spec version {version}",
            fix="use the vitscope release that wrote it",
        )
    return CacheAttrs.from_json(data, meta)


def _validate_arrays(cache: Cache, layer: int) -> None:
    attrs = cache.attrs
    name = layer_array_name(layer)
    try:
        array = cache._array(layer)
    except KeyError:
        raise CacheSpecError(
            cache.location.url(name), f"the array of cached layer {layer}", "nothing"
        ) from None
    expected = (
        (attrs.capacity, attrs.n_tokens, attrs.d_model),
        (attrs.chunk_images, attrs.n_tokens, attrs.d_model),
        np.dtype(cache.encoding.zarr_dtype),
    )
    found = (array.shape, array.chunks, array.dtype)
    if found != expected:
        raise CacheSpecError(
            cache.location.url(name),
            "shape {}, chunks {}, dtype {}".format(*expected),
            "shape {}, chunks {}, dtype {}".format(*found),
        )
    try:
        chunk_decoder(array.metadata.codecs)
    except ValueError as err:
        raise CacheSpecError(
            cache.location.url(f"{name}/zarr.json"), "the codecs SPEC.md allows", str(err)
        ) from None


def _check_compatible(path: Path | str, existing: CacheAttrs, wanted: CacheAttrs) -> None:
    diffs = [
        f"{name}={getattr(existing, name)!r} (this run: {getattr(wanted, name)!r})"
        for name in COMPATIBLE_FIELDS
        if getattr(existing, name) != getattr(wanted, name)
    ]
    if existing.token_layout != wanted.token_layout:
        diffs.append(f"token layout {existing.token_layout} (this run: {wanted.token_layout})")
    if diffs:
        raise CacheSpecError(
            path,
            "a cache written with this run's settings",
            "one written with " + ", ".join(diffs),
            fix="use a new --out, or this cache's settings",
        )


def _append_shards(location: LocalFolder | ObjectStore, shards: Sequence[str]) -> None:
    """Grow every array by R rows per new shard, then the attrs; under the location's lock."""
    with location.lock():
        attrs = _read_attrs(location)
        new = [s for s in shards if s not in attrs.shards]
        if not new:
            return
        grown = dataclasses.replace(attrs, shards=attrs.shards + tuple(new))
        group = zarr.open_group(location.zarr_store(), mode="r+")
        for layer in attrs.layers:
            group[layer_array_name(layer)].resize((grown.capacity, attrs.n_tokens, attrs.d_model))
            if ENCODINGS[attrs.storage].scaled:
                group[scale_array_name(layer)].resize(
                    (grown.capacity // attrs.chunk_images, attrs.d_model)
                )
        group.attrs.update({ATTRS_KEY: grown.to_json()})
