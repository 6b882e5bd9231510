"""Storage encodings refuse what they cannot hold, in one line, before anything is written; a
chunk read straight from its file decodes as Zarr does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import zarr

from conftest import synthetic_cache
from vitscope.cache_spec import CacheSpecError, open_cache
from vitscope.cache_spec.storage import ENCODINGS, StorageRangeError


@pytest.mark.parametrize(
    ("storage", "value", "message"),
    [
        ("float16", float("nan"), "NaN or infinite"),
        ("int8", float("inf"), "NaN or infinite"),
        ("float16", 70000.0, "activations reach 7e+04, beyond float16's 65504; cache with"),
    ],
)
def test_unstorable_activations_are_refused(storage: str, value: float, message: str):
    acts = torch.randn(2, 3, 4)
    acts[1, 2, 3] = value
    with pytest.raises(StorageRangeError, match=re.escape(message)):
        ENCODINGS[storage].encode(acts)


def test_float32_storage_keeps_large_values():
    acts = torch.randn(2, 3, 4) * 1e5
    stored, scale = ENCODINGS["float32"].encode(acts)
    assert scale is None and torch.equal(ENCODINGS["float32"].decode(stored, None), acts)


@pytest.mark.parametrize("storage", list(ENCODINGS))
@pytest.mark.parametrize("codec", ["none", "zstd-1", "blosc-lz4-shuffle"])
def test_chunks_read_from_their_files_equal_zarrs_read(tmp_path: Path, storage: str, codec: str):
    """Every chunk, the tail chunk of a shard (3 of 4 rows) included, in float32 and float16."""
    path = synthetic_cache(
        tmp_path / "c", n_images=23, rows_per_shard=12, storage=storage, codec=codec
    )
    cache = open_cache(path)
    refs = cache.chunks()
    assert {ref.n_rows for ref in refs} == {4, 3}
    stored = zarr.open_array(path / "layer_03")
    scales = zarr.open_array(path / "layer_03_scale") if cache.encoding.scaled else None
    for ref in refs:
        rows = slice(ref.first_row, ref.first_row + ref.n_rows)
        scale_1D = None if scales is None else scales[ref.index : ref.index + 1]
        for dtype in (torch.float32, torch.float16):
            by_zarr = cache.encoding.decode(stored[rows], scale_1D, dtype)
            assert torch.equal(cache.read_chunk(3, ref, dtype), by_zarr)


def test_a_missing_chunk_file_is_named(tmp_path: Path):
    cache = open_cache(synthetic_cache(tmp_path / "c", n_images=8, codec="none"))
    ref = cache.chunks()[1]
    Path(cache.chunk_file(3, ref).path).unlink()
    with pytest.raises(
        CacheSpecError, match=r"c/1/0/0: expected the stored chunk of committed rows 4..7"
    ):
        cache.read_chunk(3, ref)


def test_a_codec_outside_the_spec_is_refused_on_opening(tmp_path: Path):
    path = synthetic_cache(tmp_path / "c", n_images=8)
    meta = zarr.open_array(path / "layer_03").metadata.to_dict()
    zarr.create_array(
        path / "layer_03",
        shape=meta["shape"],
        chunks=(4, 5, 8),
        dtype="float32",
        compressors=zarr.codecs.GzipCodec(),
        overwrite=True,
        dimension_names=("row", "token", "channel"),
    )
    with pytest.raises(
        CacheSpecError, match=r"layer_03/zarr.json: expected the codecs SPEC\.md allows"
    ):
        open_cache(path)
