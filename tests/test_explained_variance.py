"""Held-out explained variance, two ways: the standard ratio of sums (predicting the data's mean
explains nothing) and sache's mean of per-token ratios in standardised units, as CLIP-Scope's
card reports it (checked against the definition written out by hand); neither depends on how the
evaluation is batched, and both reach log.jsonl, the model card and report.png."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from vitscope.cache_spec.tokens import TokenLayout
from vitscope.saes.card import SAECard
from vitscope.saes.folder import load_sae_folder
from vitscope.saes.model_card import model_card, run_metrics
from vitscope.saes.sae import SAE
from vitscope.support.configs import load_config
from vitscope.support.run_log import read_log
from vitscope.train.config import TrainConfig
from vitscope.train.explained_variance import ExplainedVariance, Moments
from vitscope.train.loader import tensor_batches
from vitscope.train.metrics import heldout_metrics
from vitscope.train.report import plot_run
from vitscope.train.synthetic import planted_tokens, planted_world
from vitscope.train.trainer import fit, new_member

WORLD = planted_world(n_features=64, d_in=32, seed=0, active=4)
"""Planted features with a mean offset twice the signal's norm, as a ViT's residual stream has."""
IMAGES, TOKENS = 16, 17
"""Held-out "images" of a CLS token and 16 patches."""
PATCHES = slice(1, None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SAE, torch.Tensor]:
    """A TopK SAE trained briefly on planted tokens (its run folder, the SAE in float64) and
    held-out activations (IMAGES, TOKENS, 32) in float64."""
    x, _ = planted_tokens(WORLD, 20_480, seed=1)
    heldout, _ = planted_tokens(WORLD, IMAGES * TOKENS, seed=2)
    run = tmp_path_factory.mktemp("ev") / "run"
    settings = {"tokens": len(x), "batch_size": 1024, "n_latents": 128, "k": 4}
    cfg = load_config(TrainConfig, None, cache="in-memory", out=str(run), **settings)
    member = new_member(cfg, 32, x[:8192], torch.device("cpu"))
    heldout_NTD = heldout.view(IMAGES, TOKENS, 32)
    fit([member], tensor_batches(x, 1024), heldout_NTD, PATCHES)
    return run, member.sae.double().eval(), heldout_NTD.double()


def saches_explained_variance(x: np.ndarray, recon: np.ndarray) -> float:
    """sache/train.py's training_step, written out: standardise each dimension over the batch
    (unbiased std, + 1e-6), then average over tokens 1 − ‖z − ẑ‖² / ‖z − mean over dims of z‖²."""
    mean, std = x.mean(axis=0), x.std(axis=0, ddof=1)
    z, z_hat = (x - mean) / (std + 1e-6), (recon - mean) / (std + 1e-6)
    per_token = []
    for token, token_hat in zip(z, z_hat, strict=True):
        unexplained = np.sum((token - token_hat) ** 2)
        spread = np.sum((token - token.mean()) ** 2)
        per_token.append(1 - unexplained / spread)
    return float(np.mean(per_token))


def patches(acts_NTD: torch.Tensor) -> np.ndarray:
    return acts_NTD[:, PATCHES].reshape(-1, acts_NTD.shape[-1]).numpy()


def test_clipscope_ev_is_saches_definition_computed_by_hand(trained):
    """On three images' 48 patch tokens, through the evaluation the trainer runs."""
    _, sae, heldout_NTD = trained
    few = heldout_NTD[:3]
    x, recon = patches(few), patches(sae(few).detach())
    measured = heldout_metrics(sae, few, PATCHES, batch_size=TOKENS)  # one image per batch
    assert measured.clipscope_ev == pytest.approx(saches_explained_variance(x, recon), abs=1e-12)
    fvu = np.sum((x - recon) ** 2) / np.sum((x - x.mean(axis=0)) ** 2)
    assert measured.fvu == pytest.approx(fvu, abs=1e-12)
    assert abs(measured.clipscope_ev - measured.explained_variance) > 0.01  # two numbers


def test_the_standardising_sae_is_measured_in_the_activations_units(trained):
    """An SAE that standardises its inputs per batch is scored on what `sae(acts)` returns."""
    _, sae, heldout_NTD = trained
    standardizing = copy.deepcopy(sae)
    standardizing.set_input_norm("standardize")
    whole = heldout_NTD.reshape(-1, 32)  # one batch: the SAE standardises with all of it
    x = patches(heldout_NTD)
    recon = patches(standardizing(whole).detach().view(IMAGES, TOKENS, 32))
    measured = heldout_metrics(standardizing, heldout_NTD, PATCHES, batch_size=len(whole))
    fvu = np.sum((x - recon) ** 2) / np.sum((x - x.mean(axis=0)) ** 2)
    assert measured.fvu == pytest.approx(fvu, abs=1e-12)
    assert measured.clipscope_ev == pytest.approx(saches_explained_variance(x, recon), abs=1e-12)


def test_predicting_the_data_mean_explains_nothing(trained):
    _, sae, heldout_NTD = trained
    mean_predictor = copy.deepcopy(sae)
    with torch.no_grad():
        mean_predictor.w_dec.zero_()  # every reconstruction is b_pre
        mean_predictor.b_pre.copy_(torch.from_numpy(patches(heldout_NTD).mean(axis=0)))
        mean_predictor.b_pre.mul_(mean_predictor.input_scale)
    measured = heldout_metrics(mean_predictor, heldout_NTD, PATCHES, batch_size=TOKENS)
    assert measured.explained_variance == pytest.approx(0, abs=1e-12)
    assert measured.fvu == pytest.approx(1, abs=1e-12)


def test_the_numbers_do_not_depend_on_the_evaluation_batch_size(trained):
    _, sae, heldout_NTD = trained
    by_batch = [
        heldout_metrics(sae, heldout_NTD, PATCHES, batch_size)
        for batch_size in (TOKENS, 3 * TOKENS, 7 * TOKENS, IMAGES * TOKENS)
    ]
    for name in ("fvu", "explained_variance", "clipscope_ev", "mse", "l0"):
        values = [getattr(measured, name) for measured in by_batch]
        assert max(values) - min(values) < 1e-12, (name, values)


def test_moments_merge_exactly_across_uneven_batches_despite_a_large_mean():
    """A residual stream's mean is far larger than its spread; the merged sums still match a
    direct float64 computation over all vectors, however they were split."""
    generator = torch.Generator().manual_seed(0)
    x = 300 + torch.randn(1000, 8, generator=generator)
    direct = float(((x.double() - x.double().mean(dim=0)) ** 2).sum())
    for sizes in ([1000], [1, 999], [3, 500, 7, 490], [250] * 4):
        moments = Moments()
        for part in x.split(sizes):
            moments.add(part)
        assert float(moments.total_variance()) == pytest.approx(direct, rel=1e-12)
        torch.testing.assert_close(moments.std_D(), x.double().std(dim=0), rtol=1e-12, atol=0)


def test_no_tokens_give_nan_not_an_error():
    """A trainer told to score no tokens (bench/batch_rule_probe.py's `slice(0)`) logs NaN."""
    explained = ExplainedVariance(Moments())
    explained.add(torch.zeros(0, 4), torch.zeros(0, 4))
    assert np.isnan(explained.fvu()) and np.isnan(explained.clipscope_ev())


def test_the_log_the_card_and_the_report_carry_both(trained):
    run, _, _ = trained
    last = read_log(run)[-1].heldout
    assert last.clipscope_ev is not None and 0 < last.clipscope_ev < 1
    metrics = run_metrics(run)
    assert metrics["clipscope_ev"] == last.clipscope_ev
    card = model_card(_card(run), metrics, "you/sae")
    assert f"| held-out explained variance | {last.explained_variance:.4f} |" in card
    assert f"| held-out explained variance, CLIP-Scope's | {last.clipscope_ev:.4f} |" in card
    older = model_card(_card(run), {**metrics, "clipscope_ev": None}, "you/sae")
    assert "| held-out explained variance, CLIP-Scope's |" not in older  # a log before it
    assert plot_run(run, TokenLayout.legacy(TOKENS)).stat().st_size > 0


def _card(run: Path) -> SAECard:
    return load_sae_folder(run).card
