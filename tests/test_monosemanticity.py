"""The MonoSemanticity Score: the linear-time streaming sums equal the O(N²) definition, a feature
on identical images scores 1 and one on unrelated images their mean similarity, and `vitscope
monosemanticity` over the photo cache stores what a brute-force pass computes, which the browser,
the picture and `vitscope compare` then show."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.by import By

import vitscope
from conftest import run_vitscope, shown_features, wait_for
from vitscope.analysis import monosemanticity as ms_module
from vitscope.analysis.compare import compare
from vitscope.analysis.config import MonosemanticityConfig
from vitscope.analysis.files import MS_FILE, MS_META_FILE, load_analysis
from vitscope.analysis.images import read_images
from vitscope.analysis.monosemanticity import (
    MSAccumulator,
    image_activations,
    monosemanticity,
    monosemanticity_scores,
)
from vitscope.cache_spec import open_cache
from vitscope.pipeline import dataset as dataset_module
from vitscope.pipeline.model import load_image_encoder
from vitscope.pipeline.shards import model_input
from vitscope.saes.architectures import build_sae
from vitscope.saes.architectures.topk import TopKOptions
from vitscope.saes.card import SAECard
from vitscope.saes.sae import SparseCodes


def brute_force_ms(acts_NF: np.ndarray, emb_NE: np.ndarray) -> np.ndarray:
    """The definition, pair by pair: activations min-max scaled per feature over the set, cosine
    similarities of the embeddings, n ≠ m; NaN where the weights sum to 0."""
    acts_NF, emb_NE = acts_NF.astype(np.float64), emb_NE.astype(np.float64)
    lo, hi = acts_NF.min(axis=0), acts_NF.max(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled_NF = (acts_NF - lo) / (hi - lo)
    unit_NE = emb_NE / np.linalg.norm(emb_NE, axis=1, keepdims=True)
    similarity_NN = unit_NE @ unit_NE.T
    off_diagonal = ~np.eye(len(acts_NF), dtype=bool)
    ms = []
    for a_N in scaled_NF.T:
        weights_NN = np.outer(a_N, a_N)[off_diagonal]
        total = weights_NN.sum()
        ms.append((weights_NN * similarity_NN[off_diagonal]).sum() / total if total else np.nan)
    return np.array(ms)


def test_image_activation_is_the_dense_codes_max_over_tokens():
    acts = torch.randn(6, 5, 8)
    for activation in ("relu", "none"):
        sae = build_sae(SAECard(8, 12, TopKOptions(k=3, activation=activation)), seed=1)
        codes = sae.encode(acts)
        expected = codes.dense().amax(dim=1)
        assert torch.equal(image_activations(codes.indices, codes.values, 12), expected)
    # Kept on every token with negative values (CLIP-Scope's raw values): the max is negative;
    # kept on one token of two: the other token's 0 is the max.
    idx = torch.tensor([[[0, 1], [0, 2]]])
    values = torch.tensor([[[-1.0, -3.0], [-2.0, 4.0]]])
    dense = SparseCodes(idx, values, 3).dense().amax(dim=1)
    assert image_activations(idx, values, 3).tolist() == dense.tolist() == [[-1.0, 0.0, 4.0]]


@pytest.mark.parametrize("dense_from", [0.0, 2.0], ids=["addmm", "index_add"])
def test_streamed_sums_equal_the_pairwise_definition(dense_from: float, monkeypatch):
    monkeypatch.setattr(ms_module, "DENSE_FROM", dense_from)  # R updated in full, or by rows
    rng = np.random.default_rng(0)
    n_images, n_features, dim = 60, 9, 16
    acts = np.maximum(rng.normal(size=(n_images, n_features)), 0) * (
        rng.random((n_images, n_features)) < 0.3
    )
    acts[:, 1] = rng.random(n_images) + 0.5  # fires on every image: min > 0
    acts[:, 2] = rng.normal(size=n_images)  # negative values (no ReLU)
    acts[:, 3] = 0.0
    acts[7, 3] = 2.0  # one image: no pair, no MS
    acts[:, 4] = 0.0  # dead
    acts[:, 5] = 3.0  # the same everywhere: scaling divides by 0
    emb = rng.normal(size=(n_images, dim)) + 0.3
    expected = brute_force_ms(acts, emb)
    assert np.isnan(expected[3:6]).all() and not np.isnan(np.delete(expected, [3, 4, 5])).any()

    accumulator = MSAccumulator.empty(n_features, dim)
    unit = torch.nn.functional.normalize(torch.from_numpy(emb).float(), dim=-1)
    for start in range(0, n_images, 16):  # chunks, the last one short
        part = slice(start, start + 16)
        accumulator.add(torch.from_numpy(acts[part]).float(), unit[part])
    np.testing.assert_allclose(accumulator.scores().numpy(), expected, atol=1e-5, equal_nan=True)
    in_memory = monosemanticity_scores(torch.from_numpy(acts).float(), torch.from_numpy(emb))
    np.testing.assert_allclose(in_memory.numpy(), expected, atol=1e-5, equal_nan=True)


def test_a_feature_on_identical_images_scores_one():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(200, 32))
    planted = rng.choice(200, size=25, replace=False)
    emb[planted] = emb[planted[0]]  # one picture, 25 times
    acts = np.zeros((200, 2))
    acts[planted, 0] = rng.random(25) * 5 + 0.1  # at different strengths
    acts[rng.choice(200, size=25, replace=False), 1] = 1.0  # anywhere
    ms = monosemanticity_scores(torch.from_numpy(acts).float(), torch.from_numpy(emb)).numpy()
    assert ms[0] == pytest.approx(1.0, abs=1e-6)
    assert abs(ms[1]) < 0.2


def test_a_feature_on_unrelated_images_scores_their_mean_similarity():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(3000, 64)) + 0.6  # a shared direction: mean cosine ~0.26
    fires = rng.choice(3000, size=600, replace=False)
    acts = np.zeros((3000, 1))
    acts[fires, 0] = rng.random(600)  # strengths unrelated to the images
    unit = emb[fires] / np.linalg.norm(emb[fires], axis=1, keepdims=True)
    similarity = unit @ unit.T
    mean_similarity = similarity[~np.eye(600, dtype=bool)].mean()
    ms = monosemanticity_scores(torch.from_numpy(acts).float(), torch.from_numpy(emb)).item()
    assert 0.2 < mean_similarity < 0.35
    assert ms == pytest.approx(mean_similarity, abs=0.01)


def pass_inputs(run: Path, cache_path: Path, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """What the MS pass folds in for the cache's `rows`, held in memory: image activations (N, F),
    the dense codes' max over tokens, and the cache's model's embeddings (N, E) of the images
    read back."""
    cache = open_cache(cache_path)
    sae = vitscope.load_sae(run)
    acts_NF = sae.encode(cache.read_rows(5, rows)).dense().amax(dim=1).numpy()
    encoder = load_image_encoder(cache.attrs.model, cache.attrs.pretrained)
    images = read_images(cache, rows)
    pixels = torch.stack([model_input(images[r], encoder.preprocess) for r in rows])
    return acts_NF, encoder.embed(pixels).numpy()


def brute_force_pass(run: Path, cache_path: Path, rows: list[int]) -> np.ndarray:
    """MS of the SAE's features over the cache's `rows`, pair by pair."""
    return brute_force_ms(*pass_inputs(run, cache_path, rows))


def stored_ms(folder: Path) -> np.ndarray:
    stored = pq.read_table(folder / MS_FILE).to_pydict()
    assert stored["feature"] == list(range(len(stored["ms"])))
    return np.array([np.nan if v is None else v for v in stored["ms"]])


def test_command_stores_what_a_brute_force_pass_computes(scored_run: Path, reference_cache: Path):
    meta = json.loads((scored_run / "analysis" / MS_META_FILE).read_text())
    cache = open_cache(reference_cache)
    rows = [r for ref in cache.chunks() for r in range(ref.first_row, ref.first_row + ref.n_rows)]
    assert meta["n_images"] == len(rows) and meta["pooling"] == "max"
    assert (meta["encoder"], meta["encoder_weights"]) == (cache.attrs.model, "none:seed=0")

    ms = stored_ms(scored_run / "analysis")
    np.testing.assert_allclose(
        ms, brute_force_pass(scored_run, reference_cache, rows), atol=1e-4, equal_nan=True
    )
    assert (~np.isnan(ms)).sum() > len(ms) // 2
    assert np.isnan(ms).sum() > 0  # e.g. features firing on fewer than two images

    picture = np.asarray(Image.open(scored_run / "analysis" / "monosemanticity.png").convert("L"))
    assert picture.astype(np.float32).std() > 10


def test_max_images_scores_the_first_whole_chunks(
    photo_sae: Path, reference_cache: Path, tmp_path: Path, monkeypatch
):
    """10 images -> the first 3 chunks of 4 rows: all of shard 0 and the start of shard 1, which
    is folded in before its last image, and the loader stops: shard 2 is never opened."""
    opened, original = [], dataset_module.read_samples

    def read_samples(shard: Path):
        opened.append(shard.name)
        return original(shard)

    monkeypatch.setattr(dataset_module, "read_samples", read_samples)
    config = MonosemanticityConfig(
        run=str(photo_sae),
        out=str(tmp_path),
        max_images=10,
        device="cpu",
        num_workers=0,
        top_labels=0,
    )
    out, meta, ms = monosemanticity(config)
    chunks = open_cache(reference_cache).chunks()[:3]
    rows = [r for ref in chunks for r in range(ref.first_row, ref.first_row + ref.n_rows)]
    assert meta.n_images == len(rows) == 12 and not (tmp_path / "meta.json").exists()
    assert opened == ["00000.tar", "00001.tar"]
    np.testing.assert_array_equal(stored_ms(out), ms.astype(np.float32))
    np.testing.assert_allclose(
        ms, brute_force_pass(photo_sae, reference_cache, rows), atol=1e-4, equal_nan=True
    )


def test_browser_and_compare_show_the_scores(
    scored_run: Path, chromium: webdriver.Chrome, tmp_path: Path
):
    browsed = run_vitscope("browse", str(scored_run))
    assert browsed.returncode == 0, browsed.stderr
    index = (scored_run / "browser" / "data" / "index.js").read_text()
    data = json.loads(index.removeprefix("VS.index = ").removesuffix(";\n"))
    ms = load_analysis(scored_run / "analysis").features["ms"].to_pylist()
    assert data["features"]["ms"] == [None if v is None else pytest.approx(v) for v in ms]
    assert data["meta"]["ms"].startswith(f"{data['meta']['images_seen']} images, ViT-S-32")

    chromium.get((scored_run / "browser" / "index.html").as_uri())
    wait_for(chromium, "#features tbody tr")
    header = chromium.find_element(By.CSS_SELECTOR, 'th[data-col="ms"]')
    values = np.array([np.nan if v is None else v for v in ms])
    scored = np.flatnonzero(~np.isnan(values))
    unscored = np.flatnonzero(np.isnan(values)).tolist()
    for descending in (True, False):
        header.click()
        by_ms = scored[np.lexsort((scored, -values[scored] if descending else values[scored]))]
        assert shown_features(chromium) == by_ms.tolist() + unscored  # no MS: last either way
    feature = unscored[0]
    chromium.get(f"{(scored_run / 'browser' / 'feature.html').as_uri()}?f={feature}")
    assert wait_for(chromium, '#stats td[data-col="ms"]')[0].text == "–"

    written = compare([scored_run], tmp_path / "cmp")
    with open(written[1]) as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["mean_ms"]) == pytest.approx(np.nanmean(values), rel=1e-6)
    assert row["ms_encoder"] == "ViT-S-32 (none:seed=0)"
    assert "| mean MS |" in written[0].read_text()


def test_an_encoder_needs_its_weights_and_a_bad_one_is_one_line(photo_sae: Path, tmp_path: Path):
    result = run_vitscope("monosemanticity", str(photo_sae), "--encoder", "ViT-B-32")
    assert result.returncode == 2 and "--encoder-weights" in result.stderr
    result = run_vitscope(
        "monosemanticity",
        str(photo_sae),
        "--out",
        str(tmp_path / "ms"),
        "--encoder",
        "no-such-model",
        "--encoder-weights",
        "none",
        "--device",
        "cpu",
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown open_clip model")


def test_the_encoder_may_be_any_open_clip_model():
    """A ResNet image tower (no transformer.resblocks, so not one the cache could read) embeds."""
    encoder = load_image_encoder("RN50", "none")
    assert (encoder.image_size, encoder.embed_dim) == (224, 1024)
    photo = Image.new("RGB", (300, 200), (200, 120, 40))
    emb = encoder.embed(model_input(photo, encoder.preprocess)[None])
    assert emb.shape == (1, 1024) and torch.linalg.norm(emb).item() == pytest.approx(1.0)
