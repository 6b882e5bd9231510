"""Features named by the text tower: on constructed embeddings the top label is the one built to
match, with exact cosines; over the photo cache `vitscope monosemanticity` stores the labels a
brute-force pass computes, `vitscope search` ranks the features a direct cosine ranks, and the
browser shows the labels and finds features by typed text in Chromium."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from selenium.webdriver.common.by import By
from test_monosemanticity import pass_inputs
from test_user_errors import one_line

from conftest import PHOTO_LABELS, run_vitscope, wait_for
from vitscope.analysis import text_labels
from vitscope.analysis.browser_labels import SEARCH_FEATURES
from vitscope.analysis.files import MonosemanticityMeta, write_monosemanticity
from vitscope.analysis.label_files import (
    FEATURE_EMBEDDINGS_FILE,
    LABELS_FILE,
    LABELS_META_FILE,
    read_feature_embeddings,
    read_vocabulary,
)
from vitscope.analysis.monosemanticity import MSAccumulator
from vitscope.analysis.text_labels import (
    best_matches,
    name_features,
    ranked_features,
    top_labels,
    vocabulary,
)
from vitscope.cache_spec import open_cache
from vitscope.pipeline.model import load_text_tower
from vitscope.support.errors import BadSetting, MissingInput


def test_top_labels_are_the_ones_built_to_match_with_exact_cosines():
    """Labels along orthonormal axes; feature f built as 3·t_a + 2·t_b + t_c: its labels are a,
    b, c in that order with cosines 3, 2, 1 over √14. A feature with no embedding is not named."""
    basis_LE = torch.linalg.qr(torch.randn(12, 6, generator=torch.Generator().manual_seed(0)))[0].T
    labels = ["cat", "car", "moon", "coffee", "rocket", "text"]
    built = [(1, 4, 0), (5, 2, 3), (0, 1, 2)]
    features_FE = torch.zeros(4, 12)
    for f, (a, b, c) in enumerate(built):
        features_FE[f] = (3 * basis_LE[a] + 2 * basis_LE[b] + basis_LE[c]) / math.sqrt(14)
    # feature 3 stays a zero row: no embedding
    table = top_labels(features_FE, basis_LE, labels, 3).to_pydict()
    assert table["feature"] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert table["rank"] == [0, 1, 2] * 3
    assert table["label"] == [labels[i] for triple in built for i in triple]
    np.testing.assert_allclose(table["score"], np.array([3, 2, 1] * 3) / math.sqrt(14), atol=1e-6)


def test_features_are_ranked_for_a_text_and_those_without_an_embedding_never_are():
    """All cosines negative but one: a zero row (cosine 0) would outrank them, and must not."""
    text_1E = torch.tensor([[1.0, 0.0]])
    features_FE = torch.tensor([[-0.6, 0.8], [0.0, 0.0], [-1.0, 0.0], [0.6, 0.8], [0.0, -1.0]])
    scores, features = ranked_features(text_1E, features_FE, 10)
    assert features.tolist() == [[3, 4, 0, 2]]
    np.testing.assert_allclose(scores[0].numpy(), [0.6, 0.0, -0.6, -1.0], atol=1e-7)


def test_matches_in_blocks_equal_one_product(monkeypatch):
    generator = torch.Generator().manual_seed(1)
    queries = torch.randn(37, 8, generator=generator)
    keys = torch.randn(50, 8, generator=generator)
    expected = (queries @ keys.T).topk(7, dim=1)
    monkeypatch.setattr(text_labels, "MATCH_BLOCK", 120)  # 2 queries a block, 19 blocks
    scores, indices = best_matches(queries, keys, 7)
    assert torch.equal(indices, expected.indices) and torch.allclose(scores, expected.values)
    assert best_matches(queries, keys, 80)[1].shape == (37, 50)  # n above the keys: all of them


def test_feature_embedding_is_the_ms_weighted_image_embedding():
    """Σ a_n e_n with MS's min-max scaled a_n, normalised: for a sparse feature, one without ReLU
    (negative values: the shift matters) and one firing on every image; none for a feature with
    the same value everywhere, or dead."""
    rng = np.random.default_rng(3)
    acts = np.zeros((40, 5))
    acts[rng.choice(40, 9, replace=False), 0] = rng.random(9) + 0.1
    acts[:, 1] = rng.normal(size=40)
    acts[:, 2] = rng.random(40) + 2.0
    acts[:, 3] = 1.5
    emb = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(40, 16))).float(), dim=1)
    accumulator = MSAccumulator.empty(5, 16)
    for part in torch.arange(40).split(16):
        accumulator.add(torch.from_numpy(acts[part.numpy()]).float(), emb[part])
    got = accumulator.feature_embeddings()
    assert got.dtype == torch.float16
    lo, hi = acts.min(axis=0), acts.max(axis=0)
    for f in range(3):
        scaled = (acts[:, f] - lo[f]) / (hi[f] - lo[f])
        weighted = scaled @ emb.double().numpy()
        expected = weighted / np.linalg.norm(weighted)
        np.testing.assert_allclose(got[f].float().numpy(), expected, atol=2e-3)
    assert not got[3:].any()


def test_a_vocabulary_file_is_read_once_a_line_and_a_bad_one_is_refused(tmp_path: Path):
    path = tmp_path / "words.txt"
    path.write_text("cat\n\n  dog \ncat\n")
    assert vocabulary(str(path)) == (str(path), ["cat", "dog"])
    _, imagenet = vocabulary("")
    assert len(imagenet) == 998 and imagenet[:2] == ["tench", "goldfish"]  # 2 names repeat
    path.write_text("\n \n")
    with pytest.raises(BadSetting, match="expected labels, one a line, found none"):
        vocabulary(str(path))
    with pytest.raises(MissingInput, match="expected a file of labels"):
        vocabulary(str(tmp_path / "no-such.txt"))


def test_a_model_without_a_text_tower_is_skipped_in_one_line(tmp_path: Path, capsys):
    meta = MonosemanticityMeta("sae", "cache", 5, "all", 4, 10, "timm:vit_small_patch14_dinov2",
                               "none:seed=0", 8)  # fmt: skip
    features = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    assert name_features(tmp_path, features, meta, ("x", ["cat"]), 3, "cpu") is None
    assert capsys.readouterr().err.strip().splitlines() == [
        "... timm:vit_small_patch14_dinov2 has no text tower: the features are not named in words"
    ]
    assert list(tmp_path.iterdir()) == []


def text_embeddings(model: str, weights: str, texts: list[str]) -> torch.Tensor:
    """Each text in every template through the text tower, one at a time: unit-norm, averaged,
    normalised (the zero-shot classifier's recipe, not its code)."""
    tower = load_text_tower(model, weights)
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = tower.tokenizer([template.format(text) for template in text_labels.templates()])
            prompts = torch.nn.functional.normalize(tower.clip.encode_text(ids), dim=-1)
            rows.append(torch.nn.functional.normalize(prompts.mean(dim=0), dim=0))
    return torch.stack(rows).double()


def test_monosemanticity_names_the_features_as_a_brute_force_pass(
    scored_run: Path, reference_cache: Path
):
    folder = scored_run / "analysis"
    meta = json.loads((folder / LABELS_META_FILE).read_text())
    cache = open_cache(reference_cache)
    assert (meta["encoder"], meta["encoder_weights"]) == (cache.attrs.model, "none:seed=0")
    assert (meta["n_labels"], meta["top_labels"], len(meta["templates"])) == (6, 3, 7)

    rows = [r for ref in cache.chunks() for r in range(ref.first_row, ref.first_row + ref.n_rows)]
    acts_NF, emb_NE = (a.astype(np.float64) for a in pass_inputs(scored_run, reference_cache, rows))
    lo, hi = acts_NF.min(axis=0), acts_NF.max(axis=0)
    spread = hi > lo
    weighted_FE = ((acts_NF - lo) / np.where(spread, hi - lo, 1)).T @ emb_NE
    unit_FE = weighted_FE / np.linalg.norm(weighted_FE, axis=1, keepdims=True).clip(1e-30)
    texts_LE = text_embeddings(cache.attrs.model, "none:seed=0", list(PHOTO_LABELS)).numpy()
    cosine_FL = unit_FE @ texts_LE.T

    stored = pq.read_table(folder / LABELS_FILE).to_pydict()
    named = sorted(set(stored["feature"]))
    assert named == np.flatnonzero(spread).tolist() and meta["n_named"] == len(named)
    by_feature = np.array(stored["feature"]).reshape(-1, 3)
    assert (by_feature == by_feature[:, :1]).all() and stored["rank"] == [0, 1, 2] * len(named)
    labels = np.array(stored["label"]).reshape(-1, 3)
    scores = np.array(stored["score"]).reshape(-1, 3)
    column = {label: i for i, label in enumerate(PHOTO_LABELS)}
    for f, f_labels, f_scores in zip(named, labels, scores, strict=True):
        expected = cosine_FL[f, [column[label] for label in f_labels]]
        np.testing.assert_allclose(f_scores, expected, atol=2e-3)  # float16 feature embeddings
        np.testing.assert_allclose(f_scores, np.sort(cosine_FL[f])[::-1][:3], atol=2e-3)
    np.testing.assert_allclose(
        read_feature_embeddings(folder)[named].astype(np.float64), unit_FE[named], atol=2e-3
    )
    vocab, stored_texts = read_vocabulary(folder)
    assert vocab == list(PHOTO_LABELS)
    np.testing.assert_allclose(stored_texts, texts_LE, atol=1e-5)


def search_output(stdout: str) -> tuple[list[int], list[float], list[str]]:
    rows = [line.split(maxsplit=4) for line in stdout.strip().splitlines()[2:]]
    return [int(r[1]) for r in rows], [float(r[2]) for r in rows], [r[4] for r in rows]


def test_search_ranks_the_features_nearest_a_text(scored_run: Path):
    folder = scored_run / "analysis"
    args = ("search", str(scored_run), "an orange cat", "--top", "5", "--device", "cpu")
    result = run_vitscope(*args)
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0]
    assert header.startswith('features nearest "an orange cat" under 6 labels')
    assert header.endswith("random weights: the words mean little")

    features, cosines, best = search_output(result.stdout)
    text_E = text_embeddings("ViT-S-32", "none:seed=0", ["an orange cat"])[0].numpy()
    stored_FE = read_feature_embeddings(folder).astype(np.float64)
    cosine_F = np.where(stored_FE.any(axis=1), stored_FE @ text_E, -np.inf)
    assert len(features) == 5
    np.testing.assert_allclose(cosines, cosine_F[features], atol=1e-4)
    np.testing.assert_allclose(cosines, np.sort(cosine_F)[::-1][:5], atol=1e-4)
    labels = pq.read_table(folder / LABELS_FILE, filters=[("rank", "=", 0)]).to_pydict()
    label_of = dict(zip(labels["feature"], labels["label"], strict=True))
    assert best == [label_of[f] for f in features]


def test_search_errors_are_one_line(photo_analysis: Path, scored_run: Path, tmp_path: Path):
    run = photo_analysis.parent  # analysed, never scored
    result = run_vitscope("search", str(run), "a cat", "--analysis", str(photo_analysis))
    assert result.returncode == 1
    assert one_line(result.stderr).endswith("run `vitscope monosemanticity RUN` first")

    result = run_vitscope("search", str(scored_run), " ")
    assert result.returncode == 1 and "expected a text to search for" in one_line(result.stderr)

    folder = tmp_path / "analysis"  # features scored by a model without a text tower
    meta = MonosemanticityMeta("sae", "cache", 5, "all", 4, 10, "timm:vit_small_patch14_dinov2",
                               "none:seed=0", 8)  # fmt: skip
    write_monosemanticity(folder, meta, np.full(4, 0.5))
    result = run_vitscope("search", "sae", "a cat", "--analysis", str(folder))
    assert result.returncode == 1
    assert "timm:vit_small_patch14_dinov2's image embeddings, and it has no text tower" in (
        one_line(result.stderr)
    )

    args = ["monosemanticity", str(scored_run), "--out", str(tmp_path / "ms")]
    result = run_vitscope(*args, "--labels", str(tmp_path / "no-such.txt"))
    assert result.returncode == 1 and "no-such.txt: expected a file of labels" in (
        one_line(result.stderr)
    )
    assert "loading" not in result.stderr  # refused before any work


def test_browser_shows_the_labels_and_finds_features_by_text(scored_run: Path, chromium):
    browsed = run_vitscope("browse", str(scored_run))
    assert browsed.returncode == 0, browsed.stderr
    folder, site = scored_run / "analysis", scored_run / "browser"
    stored = pq.read_table(folder / LABELS_FILE).to_pydict()

    chromium.get((site / "index.html").as_uri())
    cells = wait_for(chromium, '#features tbody td[data-col="label"]')
    # (feature, rank, label, score), the score to the 4 decimals of data/labels.js; + 0.0
    # turns a -0.0 into 0.0, as JavaScript's toFixed writes it
    rows = [(*row[:3], round(row[3], 4) + 0.0) for row in zip(*stored.values(), strict=True)]
    best = {f: (label, score) for f, rank, label, score in rows if rank == 0}
    assert [c.text for c in cells] == [
        f"{best[f][0]} {best[f][1]:.3f}" if f in best else "–" for f in range(len(cells))
    ]
    note = chromium.find_element(By.ID, "search-note").text
    assert note.startswith("features named by 6 labels") and "the words mean little" in note

    box = chromium.find_element(By.CSS_SELECTOR, "form.search input")
    box.send_keys("tabby cat\n")
    headings = wait_for(chromium, "#search-results h3")
    assert headings[0].text == "a tabby cat"
    first = chromium.find_elements(By.CSS_SELECTOR, "#search-results section:first-child li")
    shown = [(int(li.text.split()[1]), float(li.text.split()[2])) for li in first]
    vocab, texts_LE = read_vocabulary(folder)
    stored_FE = read_feature_embeddings(folder).astype(np.float64)
    cosine_F = np.where(stored_FE.any(axis=1), stored_FE @ texts_LE[vocab.index("a tabby cat")], -9)
    expected = np.sort(cosine_F)[::-1][: min(SEARCH_FEATURES, int(stored_FE.any(axis=1).sum()))]
    assert len(shown) == len(expected)
    np.testing.assert_allclose([s for _, s in shown], expected, atol=6e-4)
    np.testing.assert_allclose([cosine_F[f] for f, _ in shown], expected, atol=6e-4)
    link = chromium.find_element(By.CSS_SELECTOR, "#search-results li a")
    feature = shown[0][0]
    link.click()
    items = wait_for(chromium, "#labels li")
    ranked = [(label, score) for f, _, label, score in rows if f == feature]
    assert [li.text for li in items] == [f"{label} {score:.3f}" for label, score in ranked]


def test_browser_without_labels_says_why(photo_analysis: Path, tmp_path: Path, chromium):
    browsed = run_vitscope("browse", str(photo_analysis.parent), "--out", str(tmp_path / "site"))
    assert browsed.returncode == 0, browsed.stderr
    chromium.get((tmp_path / "site" / "index.html").as_uri())
    wait_for(chromium, "#features tbody tr")
    note = chromium.find_element(By.ID, "search-note").text
    assert note.startswith("no text search: ")
    assert note.endswith("run `vitscope monosemanticity RUN` first")
    assert not chromium.find_element(By.CSS_SELECTOR, "form.search").is_displayed()
    assert not chromium.find_elements(By.CSS_SELECTOR, 'th[data-col="label"]')
    chromium.get(f"{(tmp_path / 'site' / 'feature.html').as_uri()}?f=0")
    labels = wait_for(chromium, "#labels")[0]
    assert labels.text.startswith("no labels: ") and FEATURE_EMBEDDINGS_FILE not in labels.text
