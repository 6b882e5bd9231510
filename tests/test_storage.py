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


DAMAGED = "expected the stored chunk of layer 3, rows 4..7 (shard 00000.tar), found "
REWRITE = "; rewrite the shard: delete shards/00000.commit.json in the cache and re-run"


@pytest.mark.parametrize(
    ("codec", "storage", "damage", "found"),
    [
        ("none", "float32", "delete", "no file"),
        ("zstd-1", "float32", "truncate", "bytes that do not decode (Zstd decompression error"),
        ("blosc-lz4-shuffle", "float16", "truncate", "bytes where blosc's header says"),
        ("none", "float16", "truncate", "300 bytes where its rows need 320"),
        ("zstd-1", "int8", "delete scales", "no file of scales"),
        ("zstd-1", "int8", "truncate scales", "12 bytes of scales, not 32"),
    ],
)
def test_a_damaged_chunk_file_is_named_with_its_layer_rows_and_shard(
    tmp_path: Path, codec: str, storage: str, damage: str, found: str
):
    """Every read path (a chunk, arbitrary rows) names the file and the fix in one line; a
    truncated blosc chunk, which blosc itself decodes without complaint, included."""
    cache = open_cache(synthetic_cache(tmp_path / "c", n_images=12, codec=codec, storage=storage))
    ref = cache.chunks()[1]
    file = cache.chunk_file(3, ref)
    damaged = Path(file.scale_path if "scales" in damage else file.path)
    if damage.startswith("delete"):
        damaged.unlink()
    else:
        damaged.write_bytes(damaged.read_bytes()[:-20])
    for read in (lambda: cache.read_chunk(3, ref), lambda: cache.read_rows(3, [9, 5])):
        with pytest.raises(CacheSpecError) as err:
            read()
        message = str(err.value)
        assert message.startswith(f"{damaged}: {DAMAGED}"), message
        assert found in message and REWRITE in message and "\n" not in message
    assert cache.read_rows(3, [9, 0]).shape == (2, 5, 8)  # the other chunks still read


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
