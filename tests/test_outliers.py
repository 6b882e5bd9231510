"""Outlier tokens: cache-info's gamma and token-norm statistics against a numpy hand computation,
the held-out MSE split into outlier and ordinary tokens, and training with outliers left out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import cli_flags

from conftest import REGISTERS, run_vitscope, small_config, synthetic_cache
from vitscope.cache_spec.outliers import OUTLIER_RATIO, layer_norms
from vitscope.cache_spec.store import open_cache
from vitscope.saes.model_card import model_card
from vitscope.support.run_log import read_log
from vitscope.train.config import TrainConfig
from vitscope.train.loader import tensor_batches
from vitscope.train.metrics import heldout_metrics
from vitscope.train.outliers import TokenNorms
from vitscope.train.trainer import fit, new_member

LOUD_POSITION = 2
"""Where the cache with outliers puts most of them (a register-like position)."""


@pytest.fixture(scope="module")
def outlier_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic cache of 24 images of 5 tokens whose position 2 carries 50x norms in 9
    images and position 4 in 3 more: rewritten through the real write path."""
    path = synthetic_cache(tmp_path_factory.mktemp("outliers") / "cache", 24, d_model=16)
    return with_outliers(path, {LOUD_POSITION: range(9), 4: range(9, 12)})


def with_outliers(path: Path, loud: dict[int, range]) -> Path:
    """The cache with 50x norms at each position of `loud` in its rows."""
    store = open_cache(path)
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


def test_outlier_positions_name_registers_and_patches_by_the_layout(tmp_path: Path):
    """DINOv2-reg's layout: position 2 is the register reg1, position 9 the patch at row 1,
    column 0 of the 3 x 4 grid (not 'patch 2,0' as CLS + a 4 x 4 reading would have it)."""
    path = synthetic_cache(tmp_path / "cache", 24, d_model=16, layout=REGISTERS)
    (stats,) = layer_norms(open_cache(with_outliers(path, {2: range(9), 9: range(9, 12)})))
    assert stats.outlier_positions() == [(2, 0.75), (9, 0.25)]
    assert stats.lines()[1].endswith(
        "at positions 2 = reg1 (75%), 9 = patch 1,0 (25%) (share of them)"
    )


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
        f"10.00% of tokens above {OUTLIER_RATIO:g}x the median, at positions 2 = patch 0,1 "
        "(75%), 4 = patch 1,1 (25%)" in result.stdout
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


def tokens_with_outliers(n_images: int = 16, n_tokens: int = 8, d: int = 12) -> torch.Tensor:
    """Random images whose position 3 is 40x louder in every fourth image."""
    acts = torch.randn(n_images, n_tokens, d, generator=torch.Generator().manual_seed(3)) + 1.0
    acts[::4, 3] *= 40
    return acts


def small_sae(d: int = 12):
    cfg = TrainConfig(cache="in-memory", tokens=1024, batch_size=64, n_latents=32, k=4, layer=0)
    sample = tokens_with_outliers().reshape(-1, d)
    return new_member(cfg, d, sample, torch.device("cpu")).sae


@torch.no_grad()
def per_token_error(sae, acts_NTD: torch.Tensor) -> torch.Tensor:
    """Each token's squared error, every token in one batch (training_inputs: scaled units)."""
    x = sae.training_inputs(acts_NTD.reshape(-1, acts_NTD.shape[2]))
    return (sae.eval().autoencode(x).recon_BD - x).pow(2).sum(dim=1).view(acts_NTD.shape[:2])


@pytest.mark.parametrize("exclude", [0.0, 5.0])
def test_heldout_mse_splits_outlier_and_ordinary_tokens(exclude: float):
    acts = tokens_with_outliers()
    sae = small_sae()
    norms = TokenNorms.of(acts, slice(1, 8), exclude)
    held = heldout_metrics(sae, acts, slice(1, 8), batch_size=24, norms=norms)  # 3 images a batch
    error_NT = per_token_error(sae, acts)[:, 1:].double()
    norm_NT = acts[:, 1:].norm(dim=2)
    median = float(norm_NT.median())
    assert norms.median == pytest.approx(median)
    outlier_NT = norm_NT > (exclude or 10) * median
    assert int(outlier_NT.sum()) == 4
    assert held.outlier_fraction == pytest.approx(4 / (16 * 7))
    assert held.mse_outlier == pytest.approx(float(error_NT[outlier_NT].mean()), rel=1e-5)
    assert held.mse_ordinary == pytest.approx(float(error_NT[~outlier_NT].mean()), rel=1e-5)
    evaluated_NT = norm_NT <= (exclude * median if exclude else float("inf"))
    x = sae.training_inputs(acts.reshape(-1, 12)).view(16, 8, 12)[:, 1:][evaluated_NT].double()
    fvu = float(error_NT[evaluated_NT].sum() / (x - x.mean(dim=0)).pow(2).sum())
    assert held.fvu == pytest.approx(fvu, rel=1e-5)
    assert held.mse == pytest.approx(float(error_NT[evaluated_NT].mean()), rel=1e-5)
    assert (held.mse == held.mse_ordinary) == bool(exclude)


def test_exclusion_keeps_exactly_the_tokens_at_or_below_the_threshold():
    norms = TokenNorms(median=2.0, exclude_ratio=3.0)
    lengths = torch.tensor([1.0, 5.99, 6.0, 6.01, 100.0])
    everything = torch.eye(7)[[0, 3, 1, 6, 2]] * lengths[:, None]  # norms exactly the lengths
    torch.testing.assert_close(norms.kept(everything), everything[:3])
    assert TokenNorms(median=2.0).kept(everything) is everything


def test_training_leaves_outliers_out_and_records_the_threshold(tmp_path: Path):
    cache = synthetic_cache(tmp_path / "cache", 160, d_model=16)
    store = open_cache(cache)
    for ref in store.chunks():  # position 2 of every image 30x as loud
        chunk = store.read_chunk(3, ref)
        chunk[:, 2] *= 30
        store.write_chunk(3, ref.index, chunk)
    config = small_config(cache, tmp_path / "run", tokens=4096, exclude_outlier_tokens=4.0)
    result = run_vitscope("train", *cli_flags(config))
    assert result.returncode == 0, result.stderr
    training = json.loads((tmp_path / "run" / "cfg.json").read_text())["training"]
    assert training["exclude_outlier_tokens"] == 4.0
    assert training["excluded_above_norm"] == pytest.approx(4 * training["median_token_norm"])
    last = read_log(tmp_path / "run")[-1]
    assert last.tokens == 4096  # the stream's tokens: a resume seeks to the same place
    assert last.heldout.outlier_fraction == pytest.approx(1 / 5)
    assert last.heldout.mse == last.heldout.mse_ordinary < last.heldout.mse_outlier


@pytest.mark.parametrize("ratio", ["0.5", "1"])
def test_an_exclusion_threshold_at_or_below_the_median_is_refused(ratio: str, small_cache):
    result = run_vitscope("train", "--cache", str(small_cache), "--exclude-outlier-tokens", ratio)
    assert result.returncode == 2  # a setting's error, as the command line reports them
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: Invalid value: exclude_outlier_tokens must be 0 (off) or above 1 (a multiple of "
        f"the median token norm), not {float(ratio)}; cache-info's outliers are above 10"
    )


@pytest.mark.parametrize("exclude", [0.0, 4.0])
def test_no_token_above_the_threshold_reaches_a_step(exclude: float, tmp_path: Path):
    """Every 50th training token has an infinite norm: one step on it would make the weights
    NaN, so finite weights after training mean not one of them was trained on."""
    x = torch.randn(8192, 12, generator=torch.Generator().manual_seed(4)) + 1.0
    x[::50, 5] = float("inf")
    cfg = TrainConfig(
        cache="in-memory",
        out=str(tmp_path / "run"),
        tokens=4096,
        batch_size=256,
        n_latents=32,
        k=4,
        layer=0,
        exclude_outlier_tokens=exclude,
    )
    member = new_member(cfg, 12, x[:2048], torch.device("cpu"))
    heldout = torch.randn(4, 8, 12, generator=torch.Generator().manual_seed(5)) + 1.0
    fit([member], tensor_batches(x, 256), heldout, slice(None))
    assert member.state.tokens == 4096
    assert bool(torch.isfinite(member.sae.w_dec).all()) == bool(exclude)


def test_the_model_card_says_which_tokens_were_left_out():
    sample = tokens_with_outliers().reshape(-1, 12)
    for ratio, norms in [(4.0, TokenNorms(2.5, 4.0)), (0.0, TokenNorms(2.5))]:
        cfg = TrainConfig(cache="c", tokens=4096, n_latents=32, k=4, exclude_outlier_tokens=ratio)
        member = new_member(cfg, 12, sample, torch.device("cpu"))
        member.norms = norms
        text = model_card(member.card(), {}, "user/repo")
        row = "| outlier tokens | norm above 10 (4x the median) left out of training and held-out"
        assert (row in text) == bool(ratio)
