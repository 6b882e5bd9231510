"""Caches on an object store: the real pipeline, reader and loader against moto's S3 server on
127.0.0.1 (HTTP requests as to AWS, no mock objects), compared row for row with the local cache;
a writer killed mid-shard on the store, then re-run, leaves each row exactly once."""

from __future__ import annotations

import dataclasses
import os
import tarfile
import uuid
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import fsspec
import pytest
import torch
from test_resume import kill_mid_third_shard, rows_by_key

from conftest import TEST_LAYERS, cache_config, run_vitscope, synthetic_cache
from vitscope.cache_spec import create_or_open, open_cache
from vitscope.cache_spec.location import location_of
from vitscope.pipeline.run import cache
from vitscope.support.loopback_s3 import s3_environment, serve_s3
from vitscope.train.loader import ActivationStream


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """moto's server, with this process (and the processes it starts) pointed at it."""
    with serve_s3() as endpoint, pytest.MonkeyPatch.context() as env:
        for name, value in s3_environment(endpoint).items():
            env.setenv(name, value)
        yield endpoint


def new_bucket() -> str:
    name = f"vitscope-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("s3").mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def s3_cache(s3: str, shards: Path) -> str:
    """The photo shards cached by the real pipeline into a bucket (read-only)."""
    url = f"{new_bucket()}/cache"
    summary = cache(cache_config(shards, url))
    assert summary.committed == 3 and not summary.failed
    return url


def test_a_cache_on_s3_equals_the_local_one(s3_cache: str, reference_cache: Path):
    remote, local = open_cache(s3_cache), open_cache(reference_cache)
    assert rows_by_key(s3_cache).equals(rows_by_key(reference_cache))
    assert remote.chunks() == local.chunks()
    rows = [22, 0, 9, 9, 15]
    for layer in TEST_LAYERS:
        for ref in local.chunks():
            assert torch.equal(remote.read_chunk(layer, ref), local.read_chunk(layer, ref))
        assert torch.equal(remote.read_rows(layer, rows), local.read_rows(layer, rows))

    info = run_vitscope("cache-info", s3_cache)  # a fresh process finds the store by environment
    assert info.returncode == 0, info.stderr
    assert f"cache {s3_cache} (spec" in info.stdout
    assert f"shards: 3 of 3 committed; rows: 23 in {len(local.chunks())} chunks" in info.stdout


def first_batches(path: str | Path, layer: int, n: int, **settings: int) -> list[torch.Tensor]:
    """The loader's first n batches, its two reader processes forked as in training."""
    batches = ActivationStream(open_cache(path), layer, readers=2, **settings).batches()
    taken = [batch.acts_BD for batch in islice(batches, n)]
    batches.close()
    return taken


def test_the_loader_reads_s3_in_forked_readers_as_it_reads_disk(
    s3_cache: str, reference_cache: Path
):
    remote, local = (
        first_batches(path, 5, 12, batch_size=64, buffer_tokens=600)
        for path in (s3_cache, reference_cache)
    )
    assert all(torch.equal(r, x) for r, x in zip(remote, local, strict=True))


@pytest.mark.parametrize(("storage", "codec"), [("float16", "none"), ("int8", "zstd-1")])
def test_uncompressed_and_scaled_chunks_read_alike_from_s3(
    s3: str, tmp_path: Path, storage: str, codec: str
):
    url, settings = f"{new_bucket()}/cache", dict(n_images=40, storage=storage, codec=codec)
    remote, local = (
        open_cache(synthetic_cache(url, **settings)),
        open_cache(synthetic_cache(tmp_path / "cache", **settings)),
    )
    for ref in local.chunks():
        for dtype in (torch.float16, torch.float32):
            assert torch.equal(remote.read_chunk(3, ref, dtype), local.read_chunk(3, ref, dtype))
    remote_batches, local_batches = (
        first_batches(path, 3, 10, batch_size=32, buffer_tokens=50) for path in (url, local.path)
    )
    assert all(torch.equal(r, x) for r, x in zip(remote_batches, local_batches, strict=True))


def test_a_cache_on_s3_grows_its_shard_list_and_keeps_its_rows(s3: str):
    url = f"{new_bucket()}/cache"
    before = open_cache(synthetic_cache(url, n_images=20))
    grown_attrs = dataclasses.replace(before.attrs, shards=(*before.attrs.shards, "00002.tar"))
    grown = create_or_open(url, grown_attrs)
    assert grown.attrs.shards == grown_attrs.shards and grown.attrs.capacity == 48
    assert grown.uncommitted_shards() == ["00002.tar"]
    assert torch.equal(grown.read_rows(3, range(20)), before.read_rows(3, range(20)))


def test_sigkill_mid_shard_on_s3_then_rerun_gives_each_row_once(
    s3: str, shards_copy: Path, reference_cache: Path
):
    config = cache_config(shards_copy, f"{new_bucket()}/killed")
    store = location_of(config.out)
    # every member but the tar's end-of-archive blocks: at least two batches of three images
    # pass, so the shard's first chunk (four rows) is stored while its end is still awaited
    with tarfile.open(shards_copy / "00002.tar") as tar:
        last = tar.getmembers()[-1]
    members_end = last.offset_data + -(-last.size // 512) * 512
    fraction = members_end / (shards_copy / "00002.tar").stat().st_size
    tar_bytes = kill_mid_third_shard(config, fraction, lambda keys: all(map(store.exists, keys)))

    killed = open_cache(config.out)
    assert sorted(killed.committed) == [0, 1]
    assert killed.uncommitted_shards() == ["00002.tar"]

    third = shards_copy / "00002.tar"
    third.unlink()
    third.write_bytes(tar_bytes)
    resumed = cache(config)
    assert (resumed.already_committed, resumed.committed, resumed.rows) == (2, 1, 7)
    assert rows_by_key(config.out).equals(rows_by_key(reference_cache))
    done, reference = open_cache(config.out), open_cache(reference_cache)
    assert done.chunks() == reference.chunks()
    for ref in reference.chunks():
        assert torch.equal(done.read_chunk(11, ref), reference.read_chunk(11, ref))


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "expected an existing bucket, found no bucket 'no-such-bucket-here'; create it"),
        (
            {
                "AWS_ACCESS_KEY_ID": None,
                "AWS_SECRET_ACCESS_KEY": None,
                "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                "AWS_CONFIG_FILE": "/nonexistent",
                "AWS_EC2_METADATA_DISABLED": "true",
            },
            "expected a reachable object store with valid credentials, found NoCredentialsError",
        ),
    ],
    ids=["no-bucket", "no-credentials"],
)
def test_a_bad_store_is_a_one_line_error_naming_the_url(s3: str, env: dict, expected: str):
    url = "s3://no-such-bucket-here/cache"
    environment = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    result = run_vitscope("cache-info", url, env=environment)
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {url}: {expected}"), error
