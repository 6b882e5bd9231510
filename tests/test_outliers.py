"""Outlier tokens: cache-info's gamma and token-norm statistics against a numpy hand computation,
the held-out MSE split into outlier and ordinary tokens, and training with outliers left out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import run_vitscope, synthetic_cache
from vitscope.cache_spec.outliers import OUTLIER_RATIO, layer_norms
from vitscope.cache_spec.store import open_cache

LOUD_POSITION = 2
"""Where the cache with outliers puts most of them (a register-like position)."""


@pytest.fixture(scope="module")
def outlier_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic cache of 24 images of 5 tokens whose position 2 carries 50x norms in 9
    images and position 4 in 3 more: rewritten through the real write path."""
    path = synthetic_cache(tmp_path_factory.mktemp("outliers") / "cache", 24, d_model=16)
    store = open_cache(path)
    loud = {LOUD_POSITION: range(9), 4: range(9, 12)}
    for ref in store.chunks():
        chunk = store.read_chunk(3, ref)
        for position, rows in loud.items():
            for row in rows:
                if ref.first_row <= row < ref.first_row + ref.n_rows:
                    chunk[row - ref.first_row, position] *= 50
        store.write_chunk(3, ref.index, chunk)
    return path


def hand_statistics(acts_NTD: np.ndarray) -> dict[str, object]:
    """The definitions, written out: gamma over every token, norms per token."""
    tokens_ND = acts_NTD.reshape(-1, acts_NTD.shape[2])
    norms_NT = np.sqrt((acts_NTD**2).sum(axis=2))
    median = np.median(norms_NT)
    outliers_NT = norms_NT > 10 * median
    counts = {t: int(outliers_NT[:, t].sum()) for t in range(acts_NTD.shape[1])}
    return {
        "gamma": np.linalg.norm(tokens_ND.mean(axis=0)) / np.linalg.norm(tokens_ND.std(axis=0)),
        "median": median,
        "p99": np.percentile(norms_NT, 99),
        "max": norms_NT.max(),
        "share": outliers_NT.mean(),
        "counts": {t: n for t, n in counts.items() if n},
    }


@pytest.mark.parametrize("which", ["reference", "outliers"])
def test_gamma_and_norms_match_a_hand_computation(which, reference_cache, outlier_cache):
    store = open_cache(reference_cache if which == "reference" else outlier_cache)
    rows = [
        row for ref in store.chunks() for row in range(ref.first_row, ref.first_row + ref.n_rows)
    ]
    for stats in layer_norms(store, n_chunks=1000):
        acts = store.read_rows(stats.layer, rows).double().numpy()
        hand = hand_statistics(acts)
        assert stats.gamma == pytest.approx(hand["gamma"], rel=1e-9)
        assert stats.median == pytest.approx(hand["median"], rel=1e-9)
        assert stats.p99 == pytest.approx(hand["p99"], rel=1e-9)
        assert stats.max == pytest.approx(hand["max"], rel=1e-9)
        assert stats.outlier_share == pytest.approx(hand["share"])
        total = sum(hand["counts"].values())
        expected = sorted(hand["counts"].items(), key=lambda item: -item[1])[:3]
        assert stats.outlier_positions() == [(t, n / total) for t, n in expected]
    if which == "outliers":
        assert stats.outlier_positions() == [(LOUD_POSITION, 0.75), (4, 0.25)]


def test_the_sample_is_spread_over_the_cache(outlier_cache):
    """Two chunks of six: the first and the last, so a cache's tail is looked at too."""
    store = open_cache(outlier_cache)
    (stats,) = layer_norms(store, n_chunks=2)
    first, last = store.chunks()[0], store.chunks()[-1]
    rows = [*range(first.first_row, first.first_row + 4), *range(last.first_row, 24)]
    expected = store.read_rows(3, rows).double().norm(dim=2).numpy()
    np.testing.assert_allclose(stats.norms_NT, expected)


def test_cache_info_prints_gamma_norms_and_outlier_positions(outlier_cache, tmp_path):
    result = run_vitscope("cache-info", str(outlier_cache), "--plot", str(tmp_path / "n.png"))
    assert result.returncode == 0, result.stderr
    store = open_cache(outlier_cache)
    (stats,) = layer_norms(store)
    assert "token norms of 24 images (6 of 6 chunks, spread evenly; --sample-chunks)" in (
        result.stdout
    )
    assert f"layer 3: gamma = |mean| / |std| = {stats.gamma:.3g} (std per dimension)" in (
        result.stdout
    )
    assert f"median {stats.median:.4g}, p99 {stats.p99:.4g}, max {stats.max:.4g}" in result.stdout
    assert (
        f"10.00% of tokens above {OUTLIER_RATIO:g}x the median, at positions 2 (75%), 4 (25%)"
        in result.stdout
    )
    assert (tmp_path / "n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cache_info_without_the_sample(outlier_cache):
    quiet = run_vitscope("cache-info", str(outlier_cache), "--sample-chunks", "0")
    assert quiet.returncode == 0 and "token norms" not in quiet.stdout
    refused = run_vitscope(
        "cache-info", str(outlier_cache), "--sample-chunks", "0", "--plot", "x.png"
    )
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "error: --plot draws the sampled token norms, but --sample-chunks is 0; pass at least 1"
    ]
