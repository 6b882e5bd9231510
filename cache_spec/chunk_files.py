"""Read one stored chunk straight from its file into memory the caller owns.

Zarr's own whole-chunk read runs an event loop and copies the chunk three times: 0.7 GB/s per
thread where a plain read of the same file gets 4.6 (BENCHMARKS.md, issue 12). SPEC.md fixes the
layer arrays' layout, which `store._validate_arrays` checks on opening: one file per chunk, its
values little-endian behind at most one compressor (zstd or blosc), so a chunk's committed rows
are a prefix of its decoded bytes, and an uncompressed chunk can be read into its destination
with no copy at all. A `ChunkFile` is plain data, so reader processes can be handed one.

On an object store a `ChunkFile` names the chunk by URL, and each process (and thread) reads it
through its own fsspec filesystem, made on first use from the URL and the environment: fsspec's
instances and its event loop are per process (a forked child that used its parent's would fail,
"This class is not fork-safe"), so nothing but the URL crosses the fork.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numcodecs
import numpy as np
import torch
from numcodecs.abc import Codec
from zarr.abc.codec import Codec as ZarrCodec
from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec
from zarr.codecs.bytes import Endian

from vitscope.cache_spec.errors import CacheSpecError
from vitscope.cache_spec.layout import commit_key
from vitscope.cache_spec.location import is_url
from vitscope.cache_spec.storage import ENCODINGS

_DECODERS: dict[type, type[Codec]] = {ZstdCodec: numcodecs.Zstd, BloscCodec: numcodecs.Blosc}
"""The numcodecs class that decodes what each zarr compressor wrote (zarr uses the same ones)."""


def chunk_decoder(codecs: tuple[ZarrCodec, ...]) -> Codec | None:
    """The decompressor of a layer array's codec chain, None if uncompressed; ValueError when the
    chain is not the little-endian bytes codec behind at most one known compressor."""
    first, *compressors = codecs
    if not isinstance(first, BytesCodec) or first.endian not in (None, Endian.little):
        raise ValueError(f"the codecs start with {first!r}, not little-endian bytes")
    if len(compressors) > 1 or any(type(c) not in _DECODERS for c in compressors):
        raise ValueError(f"compressors {compressors!r}, not one of zstd or blosc")
    return _DECODERS[type(compressors[0])]() if compressors else None


@dataclass(frozen=True)
class ChunkFile:
    """Where a chunk's committed rows are stored and how to decode them."""

    path: str
    """A local path, or an fsspec URL (s3://...) for a cache on an object store."""
    decoder: Codec | None
    storage: str
    """The cache's storage encoding (cache_spec/storage.py)."""
    shape: tuple[int, int, int]
    """Committed rows, tokens, channels: the prefix of the chunk that holds images."""
    chunk_rows: int
    """Rows of the whole stored chunk (a shard's tail chunk is padded to it)."""
    scale_path: str | None
    """The chunk's per-channel scales (8-bit storage), uncompressed float32."""
    rows: tuple[int, int]
    """First and last cache row, for error messages."""
    layer: int
    """The cached layer, for error messages."""
    shard: str
    """The input shard these rows came from: the one to re-cache if the file is damaged."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def damaged(self, found: str, path: str | None = None) -> CacheSpecError:
        """The one-line error for a chunk (or its scales, `path`) that cannot be read whole."""
        return CacheSpecError(
            path or self.path,
            f"the stored chunk of layer {self.layer}, rows {self.rows[0]}..{self.rows[1]} "
            f"(shard {self.shard})",
            found,
            fix=f"rewrite the shard: delete {commit_key(self.shard)} in the cache and re-run "
            "`vitscope cache` with the same settings",
        )


def read_chunk_file(file: ChunkFile, out: torch.Tensor) -> None:
    """Decode the chunk's committed rows into `out` (contiguous, `file.numel` values of float16 or
    float32): storage of out's dtype is read straight into it, anything else through a buffer."""
    encoding = ENCODINGS[file.storage]
    stored_dtype = np.dtype(encoding.zarr_dtype)
    direct = not encoding.scaled and stored_dtype == _numpy_dtype(out.dtype)
    stored = out if direct else torch.empty(file.numel * stored_dtype.itemsize, dtype=torch.uint8)
    _read_stored(file, stored.view(torch.uint8).reshape(-1))
    if not direct:
        scale_D = None if file.scale_path is None else _read_scales(file, file.scale_path)
        values = stored.numpy().view(stored_dtype)
        decoded = encoding.decode(values.reshape(-1, file.shape[-1]), scale_D, out.dtype)
        out.view(-1).copy_(decoded.view(-1))


def _read_stored(file: ChunkFile, out_bytes: torch.Tensor) -> None:
    """The committed prefix of the chunk's stored bytes into `out_bytes` (uint8)."""
    try:
        if file.decoder is None and not is_url(file.path):
            _read_exactly(file, out_bytes.numpy())
            return
        encoded = _read_bytes(file.path)
    except FileNotFoundError:
        raise file.damaged("no file") from None
    if file.decoder is None:  # an uncompressed chunk from an object store: one copy
        _check_length(file, len(encoded), len(out_bytes))
        out_bytes.numpy()[:] = np.frombuffer(encoded, np.uint8, count=len(out_bytes))
        return
    whole_chunk = len(out_bytes) // file.shape[0] * file.chunk_rows
    if whole_chunk == len(out_bytes):
        _decode(file, encoded, out_bytes.numpy())
    else:  # a shard's tail chunk: decode the whole padded chunk, keep its committed rows
        padded = torch.empty(whole_chunk, dtype=torch.uint8)
        _decode(file, encoded, padded.numpy())
        out_bytes.copy_(padded[: len(out_bytes)])


def _decode(file: ChunkFile, encoded: bytes, out: np.ndarray) -> None:
    """Decompress a whole stored chunk into `out`; bytes that are not one (a truncated or
    overwritten file) are the chunk's one-line error, not the codec's traceback."""
    assert file.decoder is not None
    recorded = _blosc_length(encoded)
    if isinstance(file.decoder, numcodecs.Blosc) and recorded != len(encoded):
        # Blosc decodes a truncated buffer without complaint: its header says how long it was.
        raise file.damaged(f"{len(encoded)} bytes where blosc's header says {recorded}")
    try:
        file.decoder.decode(encoded, out=out)
    except (RuntimeError, ValueError) as err:
        raise file.damaged(f"bytes that do not decode ({err})") from None


def _blosc_length(encoded: bytes) -> int:
    """The compressed size a blosc buffer's 16-byte header records (bytes 12..15); -1 if the
    buffer is shorter than the header."""
    return int.from_bytes(encoded[12:16], "little") if len(encoded) >= 16 else -1


def _read_scales(file: ChunkFile, path: str) -> np.ndarray:
    """The chunk's per-channel float32 scales (8-bit storage), checked for their length."""
    try:
        scales = _read_bytes(path)
    except FileNotFoundError:
        raise file.damaged("no file of scales", path) from None
    if len(scales) != 4 * file.shape[-1]:
        raise file.damaged(f"{len(scales)} bytes of scales, not {4 * file.shape[-1]}", path)
    return np.frombuffer(bytearray(scales), "<f4")


def _read_bytes(path: str) -> bytes:
    """A whole file or object; remote ones through this process's fsspec filesystem."""
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read()
    import fsspec

    fs, key = fsspec.core.url_to_fs(path)
    return fs.cat_file(key)


def _read_exactly(file: ChunkFile, out: np.ndarray) -> None:
    """Fill `out` from the start of the file (reads may return less than asked)."""
    with open(file.path, "rb", buffering=0) as f:
        view, filled = memoryview(out).cast("B"), 0
        while filled < len(view):
            got = f.readinto(view[filled:])
            if not got:
                _check_length(file, filled, len(view))
            filled += got


def _check_length(file: ChunkFile, found: int, needed: int) -> None:
    if found < needed:
        raise file.damaged(f"{found} bytes where its rows need {needed}")


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype({torch.float16: "float16", torch.float32: "float32"}[dtype])
