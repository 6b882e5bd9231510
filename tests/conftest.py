"""Fixtures built from real parts: scikit-image's photos, img2dataset on 127.0.0.1, a seeded
open_clip ViT, caches on disk. Expensive ones are made once per session; copy them to mutate."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vitscope.demo import PHOTO_CAPTIONS, photo_dir, serve_folder, write_url_list
from vitscope.pipeline.config import CacheConfig, DownloadConfig
from vitscope.pipeline.download import download
from vitscope.pipeline.model import VisionTower, load_vision_tower
from vitscope.pipeline.run import cache

TEST_MODEL = "ViT-S-32"
TEST_LAYERS = (2, 5, 11)
PHOTOS = sorted(PHOTO_CAPTIONS)[:23]
"""23 photos and one missing URL: three shards of eight samples, one of them failing to download."""


def cache_config(shards: Path, out: Path, **overrides: object) -> CacheConfig:
    """Small, quick settings: a seeded random ViT-S-32, 4-image chunks, 8 rows per shard."""
    settings: dict = dict(
        shards=str(shards),
        out=str(out),
        layers=TEST_LAYERS,
        model=TEST_MODEL,
        pretrained="none",
        device="cpu",
        batch_size=3,
        num_workers=0,
        write_threads=2,
        chunk_images=4,
        rows_per_shard=8,
    )
    settings.update(overrides)
    return CacheConfig(**settings)


def cli_args(config: CacheConfig) -> list[str]:
    """The `vitscope cache` flags that reproduce a config."""
    args = ["cache"]
    for name, value in vars(config).items():
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        args += [f"--{name.replace('_', '-')}", text]
    return args


def run_vitscope(*args: str, timeout: float = 300, **kwargs: object) -> subprocess.CompletedProcess:
    """Run the real command line in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "vitscope", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


@pytest.fixture(scope="session")
def photo_url() -> str:
    with serve_folder(photo_dir()) as url:
        yield url


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory, photo_url: str) -> Path:
    """Shards made by a real img2dataset run against the loopback server (read-only: copy first)."""
    root = tmp_path_factory.mktemp("download")
    urls = write_url_list(root / "urls.csv", photo_url, PHOTOS, {"missing.png": "not served"})
    return download(
        DownloadConfig(url_list=str(urls), out=str(root / "shards"), samples_per_shard=8, threads=4)
    )


@pytest.fixture
def shards_copy(shards: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(shards, tmp_path / "shards"))


@pytest.fixture(scope="session")
def tower() -> VisionTower:
    return load_vision_tower(TEST_MODEL, "none", "cpu", "float32", seed=0)


@pytest.fixture(scope="session")
def reference_cache(tmp_path_factory: pytest.TempPathFactory, shards: Path) -> Path:
    """One uninterrupted cache run over the shards (read-only)."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    summary = cache(cache_config(shards, out))
    assert summary.committed == 3 and not summary.failed
    return out
