"""A damaged chunk file is named, with its layer, rows, shard and fix: by every pass that reads
it (one line, exit 1, no traceback) and, before any pass, by `vitscope cache-info --verify`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import run_vitscope

DAMAGED = (
    "expected the stored chunk of layer 5, rows 4..7 (shard 00000.tar), found bytes that do not "
    "decode (Zstd decompression error"
)


@pytest.fixture
def truncated(reference_cache: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the photo cache whose layer-5 chunk of rows 4..7 lost its last 100 bytes."""
    cache = Path(shutil.copytree(reference_cache, tmp_path / "cache"))
    chunk = cache / "layer_05" / "c" / "1" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-100])
    return cache, chunk


def test_verify_passes_a_whole_cache(reference_cache: Path):
    result = run_vitscope("cache-info", str(reference_cache), "--verify")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(
        "verified: all 18 committed chunks (layers 2, 5, 11) decode"
    )


def test_verify_names_the_damaged_chunk_and_fails(truncated: tuple[Path, Path]):
    cache, chunk = truncated
    result = run_vitscope("cache-info", str(cache), "--verify")
    assert result.returncode == 1
    (damaged,) = [line for line in result.stdout.splitlines() if line.startswith("damaged:")]
    assert damaged.startswith(f"damaged: {chunk}: {DAMAGED}")
    assert damaged.endswith(
        "rewrite the shard: delete shards/00000.commit.json in the cache and re-run "
        "`vitscope cache` with the same settings"
    )
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {cache}: expected 18 committed chunks that decode, found 1 damaged (listed "
        "above); rewrite the shards they name, as each line says"
    )


def test_a_pass_over_a_damaged_chunk_is_one_line(
    photo_sae: Path, truncated: tuple[Path, Path], tmp_path: Path
):
    cache, chunk = truncated
    out = tmp_path / "analysis"
    args = ["--cache", str(cache), "--out", str(out), "--grids", "0", "--device", "cpu"]
    result = run_vitscope("analyze", str(photo_sae), *args)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {chunk}: {DAMAGED}")
