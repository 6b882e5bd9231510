"""Fixtures built from real parts: scikit-image's photos, img2dataset on 127.0.0.1, a seeded
open_clip ViT, caches on disk. Expensive ones are made once per session; copy them to mutate."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from vitscope.cache_spec import CacheAttrs, ShardCommit, create_or_open
from vitscope.cache_spec.layout import ROWS_SCHEMA
from vitscope.cache_spec.tokens import TokenLayout
from vitscope.demo import PHOTO_CAPTIONS, photo_dir, serve_folder, write_url_list
from vitscope.pipeline.config import CacheConfig, DownloadConfig
from vitscope.pipeline.download import download
from vitscope.pipeline.model import VisionTower, load_vision_tower
from vitscope.pipeline.run import cache
from vitscope.train.config import TrainConfig

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on a 2-core machine: one thread each, for the worker and the
    # commands it starts, or every torch product fights the other worker's for the cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

TEST_MODEL = "ViT-S-32"
TEST_LAYERS = (2, 5, 11)
REGISTERS = TokenLayout(("cls", "reg0", "reg1", "reg2", "reg3"), (3, 4))
"""DINOv2-reg's kind of layout on a small non-square grid: CLS, 4 registers, 3 x 4 patches."""
NO_CLS = TokenLayout((), (4, 4))
"""SigLIP's kind: no prefix token at all, a 4 x 4 grid."""
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


def brute_morans_i(grid_a: np.ndarray) -> float:
    """Moran's I of a (rows, cols) grid of values the textbook way, what analysis/spatial.py must
    equal: I = (n / W) Σ_ij w_ij z_i z_j / Σ z_i², w_ij = 1 for the 8 neighbours, every patch and
    every neighbour one at a time."""
    rows, cols = grid_a.shape
    z = grid_a - grid_a.mean()
    cross = weights = 0.0
    for r in range(rows):
        for c in range(cols):
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    if (dr, dc) != (0, 0) and 0 <= r + dr < rows and 0 <= c + dc < cols:
                        cross += z[r, c] * z[r + dr, c + dc]
                        weights += 1
    return rows * cols / weights * cross / (z * z).sum()


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


def synthetic_cache(
    path: Path,
    n_images: int,
    n_tokens: int = 5,
    d_model: int = 8,
    chunk_images: int = 4,
    rows_per_shard: int = 16,
    uncommitted_shards: int = 0,
    seed: int = 0,
    storage: str = "float32",
    codec: str = "zstd-1",
    layout: TokenLayout | None = None,
) -> Path:
    """A cache written through the real cache_spec API without a model: float32 random activations
    whose channels 0 and 1 name the token (its row and its position), so tests can tell tokens
    apart. The last `uncommitted_shards` shards are written but not committed. A `layout` is
    recorded (and sets n_tokens); without one the cache is as before spec 1.4 (CLS + a square)."""
    n_shards = -(-n_images // rows_per_shard)
    n_tokens = layout.n_tokens if layout else n_tokens
    attrs = CacheAttrs(
        model="synthetic",
        pretrained="none:seed=0",
        image_size=8,
        n_tokens=n_tokens,
        d_model=d_model,
        n_blocks=4,
        layers=(3,),
        storage=storage,
        codec=codec,
        chunk_images=chunk_images,
        rows_per_shard=rows_per_shard,
        shards=tuple(f"{i:05d}.tar" for i in range(n_shards)),
        model_dtype="float32",
        preprocess="",
        prefix_tokens=layout.prefix if layout else None,
        patch_grid=layout.grid if layout else None,
    )
    store = create_or_open(path, attrs)
    generator = torch.Generator().manual_seed(seed)
    for index, shard in enumerate(attrs.shards):
        first = index * rows_per_shard
        n = min(rows_per_shard, n_images - first)
        acts = torch.randn(n, n_tokens, d_model, generator=generator) + 0.5
        acts[:, :, 0] = torch.arange(first, first + n)[:, None].float()
        acts[:, :, 1] = torch.arange(n_tokens).float()
        for offset in range(0, n, chunk_images):
            chunk = torch.zeros(chunk_images, n_tokens, d_model)
            part = acts[offset : offset + chunk_images]
            chunk[: len(part)] = part
            store.write_chunk(3, (first + offset) // chunk_images, chunk)
        if index >= n_shards - uncommitted_shards:
            continue
        rows = pa.table(
            {
                "row": list(range(first, first + n)),
                "shard": [shard] * n,
                "key": [f"{first + i:09d}" for i in range(n)],
                "url": [None] * n,
                "caption": [None] * n,
                "status": ["ok"] * n,
                "error": [None] * n,
            },
            schema=ROWS_SCHEMA,
        )
        commit = ShardCommit(shard, index, first, n, 0, 0, "synthetic", "2026-11-25T00:00:00+00:00")
        store.commit(commit, rows)
    return path


@pytest.fixture(scope="session")
def photo_sae(tmp_path_factory: pytest.TempPathFactory, reference_cache: Path) -> Path:
    """A small SAE trained by the real trainer on layer 5 of the photo cache (read-only)."""
    return train_photo_sae(reference_cache, tmp_path_factory.mktemp("photo-sae") / "run")


def train_photo_sae(reference_cache: Path, out: Path, **changes: object) -> Path:
    """The photo SAE's training run (64 latents, k = 4, 4,096 tokens), with `changes`."""
    from vitscope.train.config import TrainConfig
    from vitscope.train.run import train

    config = TrainConfig(
        cache=str(reference_cache),
        layer=5,
        out=str(out),
        tokens=4096,
        batch_size=256,
        n_latents=64,
        k=4,
        k_aux=8,
        lr=1e-3,
        dead_tokens=1024,
        buffer_tokens=400,
        heldout_fraction=0.2,
        eval_images=4,
        log_every=2048,
        device="cpu",
        **changes,  # type: ignore[arg-type]
    )
    (run_dir,) = train([config])
    return run_dir


@pytest.fixture(scope="session")
def clipscope_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file shaped like CLIP-Scope's release (`{layer}_resid/{tokens}.pt`), random tensors at
    a small width; 64 latents with k = 32, so many kept raw values are negative."""
    generator = torch.Generator().manual_seed(5)
    d_in, n_features = 16, 64
    state = {
        "pre_b": torch.randn(d_in, generator=generator),
        "enc": torch.randn(d_in, n_features, generator=generator) / d_in**0.5,
        "dec": torch.randn(n_features, d_in, generator=generator),
    }
    path = tmp_path_factory.mktemp("clipscope") / "22_resid" / "1200013184.pt"
    path.parent.mkdir()
    checkpoint = {"model_state_dict": state, "k": 32, "d_in": d_in, "n_features": n_features}
    torch.save({**checkpoint, "token_count": 1200013184}, path)
    return path


@pytest.fixture(scope="session")
def photo_analysis(photo_sae: Path, reference_cache: Path) -> Path:
    """`vitscope analyze` of the photo SAE over the photo cache, as the command runs it."""
    from vitscope.analysis.analyze import analyze
    from vitscope.analysis.config import AnalyzeConfig

    return analyze(AnalyzeConfig(run=str(photo_sae), cache=str(reference_cache), device="cpu"))


PHOTO_LABELS = ("a tabby cat", "a motorcycle", "the moon", "a cup of coffee", "a rocket", "text")
"""The vocabulary that names the scored photo SAE's features (a few labels: seconds of text)."""


@pytest.fixture(scope="session")
def scored_run(photo_sae: Path, photo_analysis: Path, tmp_path_factory) -> Path:
    """A copy of the analysed photo SAE, scored by the command line with the cache's model, its
    features named by that model's text tower from PHOTO_LABELS."""
    from vitscope.analysis.files import MS_FILE

    root = tmp_path_factory.mktemp("ms")
    run = Path(shutil.copytree(photo_sae, root / "run"))
    (root / "labels.txt").write_text("\n".join(PHOTO_LABELS) + "\n")
    result = run_vitscope(
        *("monosemanticity", str(run), "--device", "cpu", "--num-workers", "2"),
        *("--batch-size", "5", "--labels", str(root / "labels.txt"), "--top-labels", "3"),
    )
    assert result.returncode == 0, result.stderr
    assert "MS of " in result.stdout and str(run / "analysis" / MS_FILE) in result.stdout
    return run


@pytest.fixture(scope="session")
def chromium(tmp_path_factory: pytest.TempPathFactory):
    """Debian's headless Chromium through Selenium, saving downloads to `.download_dir`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = "/usr/bin/chromium"
    profile = tmp_path_factory.mktemp("chromium-profile")
    downloads = tmp_path_factory.mktemp("chromium-downloads")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        f"--user-data-dir={profile}",
        "--window-size=1280,1100",
    ):
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.download_dir = downloads
    yield driver
    driver.quit()


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic cache of 400 images of 5 tokens of width 16 (read-only)."""
    return synthetic_cache(tmp_path_factory.mktemp("train") / "cache", n_images=400, d_model=16)


def small_config(cache: Path, out: Path, **changes: object) -> TrainConfig:
    """Quick stage-two settings for the small cache: 64 latents, k = 4, batches of 128."""
    settings: dict = dict(
        cache=str(cache),
        layer=3,
        out=str(out),
        tokens=30_720,
        batch_size=128,
        n_latents=64,
        k=4,
        k_aux=8,
        lr=1e-3,
        dead_tokens=2_048,
        buffer_tokens=500,
        heldout_fraction=0.1,
        eval_images=8,
        log_every=1_024,
        checkpoint_every=4_096,
        device="cpu",
    )
    settings.update(changes)
    return TrainConfig(**settings)


BROWSER_WAIT_S = 20
"""Seconds a browser test waits for a page's elements."""


def wait_for(driver, css: str) -> list:
    """The elements matching `css` once the page has some (Selenium's explicit wait)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, BROWSER_WAIT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, css)
    )


def shown_features(driver) -> list[int]:
    """The feature ids of the browser index's rows, top to bottom."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#features tbody a')].map(a => Number(a.textContent))"
    )
