"""The feature browser in Debian's headless Chromium (through Selenium), opened from file://: the
index shows and sorts what features.parquet says, a searched id opens its page, whose top images
decode and carry a drawn heatmap; at 65,536 features the index still loads and sorts in seconds."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from conftest import BROWSER_WAIT_S, NO_CLS, REGISTERS, run_vitscope, shown_features, wait_for
from vitscope.analysis.browser import size_per_feature, write_browser
from vitscope.analysis.files import AnalysisMeta, load_analysis, write_meta, write_results
from vitscope.analysis.sorteval_config import SortEvalConfig
from vitscope.cache_spec import open_cache
from vitscope.cache_spec.tokens import TokenLayout


@pytest.fixture(scope="module")
def photo_site(photo_analysis: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_browser(load_analysis(photo_analysis), tmp_path_factory.mktemp("site") / "site")


def assert_screenshot(driver: webdriver.Chrome, path: Path) -> None:
    """Save a screenshot and check it is a PNG with more than one colour in it."""
    path.write_bytes(driver.get_screenshot_as_png())
    with Image.open(io.BytesIO(path.read_bytes())) as image:
        assert image.format == "PNG"
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 24)) > 10


def expected_order(values: np.ndarray, descending: bool) -> list[int]:
    """Feature ids by value, ties by id: the order the index must show."""
    ids = np.arange(len(values))
    return np.lexsort((ids, -values if descending else values)).tolist()


def test_index_shows_and_sorts_the_features(
    photo_analysis: Path, photo_site: Path, chromium: webdriver.Chrome, tmp_path: Path
):
    features = load_analysis(photo_analysis).features
    n_features = features.num_rows
    chromium.get(photo_site.as_uri())
    wait_for(chromium, "#features tbody tr")
    assert chromium.find_element(By.ID, "count").text.startswith(f"{n_features:,} features")
    assert shown_features(chromium) == list(range(n_features))
    assert_screenshot(chromium, tmp_path / "index.png")

    morans = features["morans_i"].to_numpy(zero_copy_only=False)
    assert 0 < np.isnan(morans).sum() < n_features  # features without one go last both ways
    header = chromium.find_element(By.CSS_SELECTOR, 'th[data-col="morans_i"]')
    assert header.text == "Moran's I"
    for column in ("max_act", "freq_images", "mean_act", "morans_i"):
        values = features[column].to_numpy(zero_copy_only=False)
        header = chromium.find_element(By.CSS_SELECTOR, f'th[data-col="{column}"]')
        header.click()
        assert shown_features(chromium) == expected_order(values, descending=True), column
        header.click()
        assert shown_features(chromium) == expected_order(values, descending=False), column


def test_searched_feature_shows_its_top_images(
    photo_analysis: Path, photo_site: Path, chromium: webdriver.Chrome, tmp_path: Path
):
    analysis = load_analysis(photo_analysis)
    first_patch = 1 if analysis.meta.token_set == "all" else 0
    # The feature with a full grid that is strongest on some patch (many fire on CLS alone).
    patch_peaks = {
        f: analysis.heatmaps(f)[:, first_patch:].max()
        for f in range(analysis.meta.n_features)
        if len(analysis.top_of(f)) == analysis.meta.top_n
    }
    feature = max(patch_peaks, key=patch_peaks.get)
    top = analysis.top_of(feature)
    fire_images = analysis.features["fire_images"].to_numpy()

    chromium.get(photo_site.as_uri())
    box = wait_for(chromium, "form.jump input")[0]
    box.send_keys(str(feature))
    box.submit()
    figures = wait_for(chromium, "#grid figure")
    assert chromium.current_url.endswith(f"feature.html?f={feature}")
    assert chromium.find_element(By.ID, "title").text.startswith(f"feature {feature} ")
    stat = chromium.find_element(By.CSS_SELECTOR, '#stats td[data-col="fire_images"]')
    assert stat.text == f"{fire_images[feature]:,}"
    assert len(figures) == len(top)
    captions = [f.find_element(By.CLASS_NAME, "caption").text for f in figures]
    assert captions == [t["caption"] or "" for t in top]
    assert any(captions)

    WebDriverWait(chromium, BROWSER_WAIT_S).until(
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('#grid img')].every(i => i.complete)"
        )
    )
    widths = chromium.execute_script(
        "return [...document.querySelectorAll('#grid img')].map(i => i.naturalWidth)"
    )
    assert widths == [112] * len(top)
    # Alpha summed over each canvas: drawn wherever a patch keeps a level above 0 of 255.
    alpha = chromium.execute_script(
        "return [...document.querySelectorAll('#grid canvas')].map(c => c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data.filter((_, i) => i % 4 === 3)"
        ".reduce((a, b) => a + b, 0))"
    )
    patches_NP = analysis.heatmaps(feature)[:, first_patch:]
    assert len(alpha) == len(top)
    levels_N = np.round(patches_NP.max(axis=1) / patches_NP.max() * 255)
    assert [a > 0 for a in alpha] == (levels_N > 0).tolist()
    assert max(alpha) > 0
    assert_screenshot(chromium, tmp_path / "feature.png")


def test_browse_command_writes_and_serves_the_site(
    photo_sae: Path, photo_analysis: Path, tmp_path: Path
):
    """`vitscope browse RUN --serve`: the site goes to --out, its size per feature is printed,
    and the server on 127.0.0.1 hands out its pages and data."""
    assert photo_analysis == photo_sae / "analysis"  # where the command looks by default
    out = tmp_path / "site"
    command = [sys.executable, "-m", "vitscope", "browse", str(photo_sae), "--out", str(out)]
    server = subprocess.Popen([*command, "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        written = server.stdout.readline()
        assert written.startswith(f"feature browser: {out / 'index.html'} (")
        assert written.rstrip().endswith(" bytes per feature)")
        url = server.stdout.readline().split(" at ")[1].split()[0]
        with urllib.request.urlopen(url, timeout=BROWSER_WAIT_S) as page:
            assert b'<script src="data/index.js">' in page.read()
        with urllib.request.urlopen(url.replace("index.html", "data/index.js")) as data:
            assert data.read().startswith(b"VS.index = {")
    finally:
        server.terminate()
        server.wait(timeout=BROWSER_WAIT_S)


def test_index_links_the_runs_sort_eval_games_written_before_or_after_it(
    photo_sae: Path, photo_analysis: Path, chromium: webdriver.Chrome, tmp_path: Path
):
    """A game page left in the run (the default folder of `vitscope sorteval RUN --judge
    human`) is linked from the index, relative to the site, and the link opens it; a game the
    command writes after browse ran is linked too, without browsing again."""
    run = shutil.copytree(photo_sae, tmp_path / "run")
    config = SortEvalConfig(run=str(run), judge="human", token="cls")
    early = config.out_dir / "game" / "sortgame.html"
    early.parent.mkdir(parents=True)
    early.write_text("<!doctype html><title>the game</title>")
    browsed = run_vitscope("browse", str(run))
    assert browsed.returncode == 0, browsed.stderr
    index = run / "browser" / "index.html"

    chromium.get(index.as_uri())
    (link,) = wait_for(chromium, "#games a")
    assert link.text == "sort-eval game (sorteval-human-cls)"
    assert link.get_attribute("href") == early.as_uri()
    link.click()
    WebDriverWait(chromium, BROWSER_WAIT_S).until(lambda d: d.title == "the game")

    played = run_vitscope("sorteval", str(run), "--judge", "human", "--pairs", "2")
    assert played.returncode == 0, played.stderr
    chromium.get(index.as_uri())
    links = wait_for(chromium, "#games a")
    assert [a.text for a in links] == [
        f"sort-eval game (sorteval-human-{token})" for token in ("all", "cls")
    ]
    links[0].click()
    WebDriverWait(chromium, BROWSER_WAIT_S).until(
        lambda d: d.find_element(By.ID, "progress").text == "0 of 2 answered"
    )


def wide_analysis(
    folder: Path, cache: Path, n_features: int, top_n: int, layout: TokenLayout
) -> Path:
    """An analysis folder of random statistics and heatmaps over the tokens of `layout` whose top
    images are real rows of `cache` (so their thumbnails can be read): the width of a real SAE,
    quickly."""
    rows = open_cache(cache).rows_table()
    rows = rows.filter(pc.is_valid(rows["row"])).to_pydict()
    rng = np.random.default_rng(0)
    fire_tokens = rng.integers(0, 10_000, n_features)
    features = pa.table(
        {
            "feature": np.arange(n_features, dtype=np.int32),
            "fire_tokens": fire_tokens,
            "fire_images": fire_tokens // 5,
            "freq_tokens": fire_tokens / 1e6,
            "freq_images": fire_tokens / 5 / 2e4,
            "mean_act": rng.random(n_features, dtype=np.float32),
            "max_act": rng.random(n_features, dtype=np.float32) * 10,
            "morans_i": pa.array(rng.random(n_features) * 1.5 - 0.5, mask=fire_tokens < 500),
            "morans_images": fire_tokens // 50,
        }
    )
    pick = rng.integers(0, len(rows["row"]), n_features * top_n)
    top_images = pa.table(
        {
            "feature": np.repeat(np.arange(n_features, dtype=np.int32), top_n),
            "rank": np.tile(np.arange(top_n, dtype=np.int16), n_features),
            "row": np.asarray(rows["row"])[pick],
            "value": rng.random(n_features * top_n, dtype=np.float32),
            **{c: np.asarray(rows[c], dtype=object)[pick] for c in ("shard", "key", "caption")},
        }
    )
    n_tokens = layout.n_tokens
    folder.mkdir()
    write_results(
        folder, features, top_images, rng.random((n_features, top_n, n_tokens), dtype=np.float32)
    )
    meta = AnalysisMeta(
        sae="synthetic",
        cache=str(cache),
        layer=5,
        token_set="all",
        n_features=n_features,
        top_n=top_n,
        n_tokens=n_tokens,
        patch_grid=layout.grid,
        chunks_total=1,
        chunks_done=1,
        images_seen=20_000,
        tokens_seen=1_000_000,
        complete=True,
        prefix_tokens=layout.prefix,
    )
    write_meta(folder, meta)
    return folder


def test_browser_at_65536_features(
    reference_cache: Path, chromium: webdriver.Chrome, tmp_path: Path
):
    n_features, top_n = 65_536, 9
    layout = TokenLayout(("cls",), (7, 7))
    folder = wide_analysis(tmp_path / "analysis", reference_cache, n_features, top_n, layout)
    analysis = load_analysis(folder)
    started = time.perf_counter()
    site = write_browser(analysis, tmp_path / "site").parent
    written_s = time.perf_counter() - started
    per_feature = size_per_feature(site, n_features)
    files = sum(1 for p in site.rglob("*") if p.is_file())
    print(f"\n65,536 features: {written_s:.1f} s, {per_feature:,.0f} bytes/feature, {files} files")
    assert 0 < per_feature < 4096
    n_images = len(pc.unique(analysis.top_images["row"]))
    # assets, index, labels (here: why there are none), layer and game links, blocks, thumbnails
    assert files == 4 + 4 + n_features // 1024 + n_images

    chromium.get((site / "index.html").as_uri())
    wait_for(chromium, "#features tbody tr")
    load_ms = chromium.execute_script(
        "return performance.getEntriesByType('navigation')[0].loadEventEnd"
    )
    # Until the frame after the click is drawn: sorting, the new rows and their layout.
    sort_ms = chromium.execute_async_script(
        "const done = arguments[0], t0 = performance.now();"
        "document.querySelector('th[data-col=\"max_act\"]').click();"
        "requestAnimationFrame(() => setTimeout(() => done(performance.now() - t0)))"
    )
    print(f"index load {load_ms:.0f} ms, sort by max act {sort_ms:.0f} ms")
    by_max = expected_order(analysis.features["max_act"].to_numpy(), descending=True)
    assert shown_features(chromium) == by_max[:100]
    assert chromium.find_element(By.ID, "count").text.startswith("65,536 features")
    assert load_ms < 5000 and sort_ms < 5000

    chromium.get(f"{(site / 'feature.html').as_uri()}?f={n_features - 1}")
    assert len(wait_for(chromium, "#grid canvas")) == top_n


@pytest.mark.parametrize("layout", [REGISTERS, NO_CLS], ids=["registers", "no-cls"])
def test_a_feature_page_draws_the_layouts_grid_and_names_its_prefix_tokens(
    reference_cache: Path, chromium: webdriver.Chrome, tmp_path: Path, layout: TokenLayout
):
    """DINOv2-reg: a 3 x 4 heatmap (raster order) with CLS and 4 registers as labelled cells
    beside it; SigLIP: a 4 x 4 heatmap and no CLS anywhere."""
    folder = wide_analysis(tmp_path / "analysis", reference_cache, 8, 4, layout)
    analysis = load_analysis(folder)
    site = write_browser(analysis, tmp_path / "site").parent
    feature = 5
    chromium.get(f"{(site / 'feature.html').as_uri()}?f={feature}")
    wait_for(chromium, "#grid canvas")
    rows, cols = layout.grid
    assert chromium.find_element(By.ID, "message").text.startswith(f"heatmap: {rows}×{cols} ")
    # Each canvas's alpha, pixel by pixel: the patches' levels on the feature's scale.
    alpha = chromium.execute_script(
        "return [...document.querySelectorAll('#grid canvas')].map(c => [c.width, c.height, "
        "[...c.getContext('2d').getImageData(0, 0, c.width, c.height).data"
        ".filter((_, i) => i % 4 === 3)]])"
    )
    heat_NT = analysis.heatmaps(feature)
    patches_NP = heat_NT[:, layout.patches]
    levels_NP = np.round(np.clip(patches_NP / patches_NP.max(), 0, 1) * 255)
    assert [[w, h] for w, h, _ in alpha] == [[cols, rows]] * 4
    np.testing.assert_array_equal([a for _, _, a in alpha], np.floor(levels_NP * 0.75 + 0.5))
    cells = chromium.execute_script(
        "return [...document.querySelectorAll('#grid figure')].map(f => [...f.querySelectorAll("
        "'.prefix .token')].map(t => [t.dataset.token, t.textContent]))"
    )
    assert [[name for name, _ in figure] for figure in cells] == [list(layout.prefix)] * 4
    shown = [[float(text.split()[1]) for _, text in figure] for figure in cells]
    np.testing.assert_allclose(
        np.reshape(shown, (4, layout.n_prefix)), heat_NT[:, : layout.n_prefix], rtol=6e-3
    )
    values = [v.text for v in chromium.find_elements(By.CSS_SELECTOR, "#grid .values")]
    assert len(values) == 4 and not any("CLS" in v for v in values)
    assert_screenshot(chromium, tmp_path / "feature.png")
