"""The training stream: each token once per epoch, a seeded order, resume by seeking, a real mix."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest
import torch
import zarr

from conftest import NO_CLS, REGISTERS, small_config, synthetic_cache
from vitscope.cache_spec import open_cache
from vitscope.cache_spec.errors import CacheSpecError
from vitscope.cache_spec.storage import ENCODINGS
from vitscope.cache_spec.tokens import TokenLayout
from vitscope.support.errors import BadSetting
from vitscope.train.loader import ActivationStream, distinct_images
from vitscope.train.readers import all_finite
from vitscope.train.run import train


@pytest.fixture(scope="module", params=["zstd-1", "none"])
def cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Compressed chunks are decoded into the readers' buffer, uncompressed ones read into it."""
    path = tmp_path_factory.mktemp("loader") / "cache"
    return open_cache(synthetic_cache(path, n_images=90, codec=request.param))


def token_ids(acts_BD: torch.Tensor) -> list[tuple[int, int]]:
    return [(int(row), int(pos)) for row, pos in acts_BD[:, :2].tolist()]


def one_epoch(stream: ActivationStream, position: int = 0) -> list[tuple[int, int]]:
    """Exactly one epoch's worth of the stream from `position` (batches may straddle epochs)."""
    seen: list[tuple[int, int]] = []
    for batch in stream.batches(position):
        seen += token_ids(batch.acts_BD)
        if len(seen) >= stream.epoch_tokens:
            return seen[: stream.epoch_tokens]
    return seen


@pytest.mark.parametrize(
    ("token_set", "positions"), [("all", range(5)), ("cls", [0]), ("patches", range(1, 5))]
)
def test_every_training_token_once_per_epoch(cache, token_set: str, positions: range):
    stream = ActivationStream(
        cache, 3, tokens=token_set, batch_size=10, buffer_tokens=40, heldout_fraction=0.1
    )
    heldout_rows = {
        r for ref in stream.heldout_chunks for r in range(ref.first_row, ref.first_row + ref.n_rows)
    }
    train_rows = set(range(90)) - heldout_rows
    assert 0 < len(heldout_rows) < 90
    expected = {(row, pos) for row in train_rows for pos in positions}
    assert stream.epoch_tokens == len(expected)
    counts = Counter(one_epoch(stream))
    assert set(counts) == expected and set(counts.values()) == {1}
    second_epoch = one_epoch(stream, stream.epoch_tokens)
    assert Counter(second_epoch) == counts and second_epoch != list(counts)


def test_order_is_a_function_of_the_seed_and_resume_is_a_seek(cache):
    def stream(seed: int) -> ActivationStream:
        return ActivationStream(cache, 3, batch_size=16, buffer_tokens=60, seed=seed)

    def first(s: ActivationStream, n: int, position: int = 0) -> list[torch.Tensor]:
        out = []
        for batch in s.batches(position):
            out.append(batch.acts_BD)
            if len(out) == n:
                return out
        return out

    reference = first(stream(7), 60)
    assert all(torch.equal(a, b) for a, b in zip(reference, first(stream(7), 60), strict=True))
    assert not torch.equal(reference[0], first(stream(8), 1)[0])
    for skip in (1, 13, 27, 41):  # inside a window, at window edges, across an epoch boundary
        resumed = first(stream(7), 60 - skip, position=16 * skip)
        assert all(torch.equal(a, b) for a, b in zip(reference[skip:], resumed, strict=True))


def test_default_buffer_mixes_over_a_thousand_images_per_batch(tmp_path: Path):
    """At ViT-L/14's 257 tokens per image, the default window of 2^19 tokens spans ~2,000 images."""
    path = synthetic_cache(
        tmp_path / "cache",
        n_images=2200,
        n_tokens=257,
        d_model=2,
        chunk_images=16,
        rows_per_shard=1104,
    )
    stream = ActivationStream(open_cache(path), 3, batch_size=4096, heldout_fraction=0.0)
    counts = []
    for batch in stream.batches(0):
        counts.append(distinct_images(batch))
        assert distinct_images(batch) == len(set(batch.acts_BD[:, 0].tolist()))
        if len(counts) == 20:
            break
    assert min(counts) >= 1000
    narrow = ActivationStream(
        open_cache(path), 3, batch_size=4096, buffer_tokens=4096, heldout_fraction=0.0
    )
    assert distinct_images(next(narrow.batches(0))) <= 32


@pytest.mark.parametrize("codec", ["zstd-1", "none"])
def test_nan_activations_stop_training_with_the_rows_named(tmp_path: Path, codec: str):
    """The writer refuses NaN, so plant one behind its back, as a bad disk or tool would."""
    path = synthetic_cache(tmp_path / "cache", n_images=8, codec=codec)
    zarr.open_array(path / "layer_03", mode="r+")[5, 2, 3] = float("nan")
    stream = ActivationStream(open_cache(path), 3, batch_size=8, heldout_fraction=0.0)
    with pytest.raises(CacheSpecError, match=r"layer 3, rows 4..7, found NaN or inf"):
        for _ in stream.batches(0):
            pass


def test_a_truncated_chunk_stops_training_with_its_file_named(tmp_path: Path):
    """The reader process's error crosses back to the trainer whole: the file, the layer, the
    rows, the shard and the fix, as a CacheSpecError (a UserError: one line at the CLI)."""
    path = synthetic_cache(tmp_path / "cache", n_images=8)
    chunk = path / "layer_03" / "c" / "1" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-20])
    stream = ActivationStream(open_cache(path), 3, batch_size=8, heldout_fraction=0.0, readers=2)
    with pytest.raises(CacheSpecError) as err:
        for _ in stream.batches(0):
            pass
    assert str(err.value).startswith(
        f"{chunk}: expected the stored chunk of layer 3, rows 4..7 (shard 00000.tar), found bytes "
        "that do not decode (Zstd decompression error"
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_finite_check_finds_every_nan_and_inf(dtype: torch.dtype):
    x = torch.randn(64, 33).to(dtype)
    x[0, 0] = torch.finfo(dtype).max  # the largest finite value is finite
    assert all_finite(x) and all_finite(x[:0])
    for bad in (float("nan"), -float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[17, 5] = bad
        assert not all_finite(y), bad


@pytest.mark.parametrize("storage", list(ENCODINGS))
def test_uncompressed_chunks_stream_their_stored_values(tmp_path: Path, storage: str):
    """Uncompressed chunk files of every storage are read straight into the readers' buffer (or
    decoded there): each image's tokens sum to what its chunk holds (a tail chunk of 3 rows too)."""
    path = synthetic_cache(
        tmp_path / "c", n_images=23, rows_per_shard=12, storage=storage, codec="none"
    )
    cache = open_cache(path)
    stream = ActivationStream(cache, 3, batch_size=5, buffer_tokens=40, heldout_fraction=0.0)
    sums = torch.zeros(cache.attrs.capacity, cache.attrs.d_model, dtype=torch.float64)
    for batch in itertools.islice(stream.batches(0), stream.epoch_tokens // 5):
        sums.index_add_(0, batch.rows_B, batch.acts_BD.double())
    for ref in cache.chunks():
        expected = cache.read_chunk(3, ref, stream.window_dtype).double().sum(dim=1)
        rows = slice(ref.first_row, ref.first_row + ref.n_rows)
        torch.testing.assert_close(sums[rows], expected)


@pytest.mark.parametrize(
    ("layout", "token_set", "positions"),
    [
        (REGISTERS, "all", range(17)),
        (REGISTERS, "cls", [0]),
        (REGISTERS, "patches", range(5, 17)),
        (NO_CLS, "all", range(16)),
        (NO_CLS, "patches", range(16)),
    ],
)
def test_token_sets_follow_the_recorded_layout(
    tmp_path: Path, layout: TokenLayout, token_set: str, positions: range
):
    """Registers are prefix tokens, not patches; without CLS the patches start at 0."""
    cache = open_cache(synthetic_cache(tmp_path / "cache", n_images=12, layout=layout))
    stream = ActivationStream(cache, 3, tokens=token_set, batch_size=4, heldout_fraction=0.1)
    train_rows = {
        r for ref in stream.train_chunks for r in range(ref.first_row, ref.first_row + ref.n_rows)
    }
    assert Counter(one_epoch(stream)) == Counter((r, p) for r in train_rows for p in positions)
    heldout_NTD, _ = stream.heldout_images(4)
    assert heldout_NTD[0, stream.token_slice, 1].tolist() == list(map(float, positions))


def test_cls_tokens_of_a_model_without_cls_is_one_line_before_any_work(tmp_path: Path):
    cache = synthetic_cache(tmp_path / "cache", n_images=12, layout=NO_CLS)
    out = tmp_path / "run"
    with pytest.raises(BadSetting, match="no CLS token") as caught:
        train([small_config(cache, out, token_set="cls")])
    assert "\n" not in str(caught.value)
    assert not out.exists()
