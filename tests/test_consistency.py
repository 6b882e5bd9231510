"""Cross-seed consistency (issue 25): the matchings against the exact Hungarian assignment, and
`vitscope consistency`, the sweep's seed pairs and `compare` on real SAE folders and runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from conftest import run_vitscope, small_config
from vitscope.analysis.latent_frequencies import frequency_bins
from vitscope.analysis.matching import (
    EXACT,
    SPARSE,
    exact_matching,
    greedy_matching,
    sparse_matching,
    unit_rows,
)
from vitscope.cli import app
from vitscope.saes.architectures import ARCHITECTURES, build_sae
from vitscope.saes.card import SAECard
from vitscope.saes.folder import save_sae_folder
from vitscope.saes.load import load_sae
from vitscope.train.loader import read_chunks


def planted(n: int, d: int, shared: int, noise: float, seed: int = 0) -> tuple:
    """Two dictionaries of unit rows: the first `shared` rows of B are rows of A, permuted, with
    noise; the rest of B is random. Returns (a, b, where each shared row of A went in B)."""
    generator = torch.Generator().manual_seed(seed)
    a = unit_rows(torch.randn(n, d, generator=generator))
    b = unit_rows(torch.randn(n, d, generator=generator))
    perm = torch.randperm(n, generator=generator)
    placed = perm[:shared]
    b[placed] = unit_rows(a[:shared] + noise * torch.randn(shared, d, generator=generator) / d**0.5)
    return a, b, placed.numpy()


def test_sparse_on_the_full_graph_is_the_exact_assignment():
    """With every edge a candidate the sparse solver must find the dense optimum exactly."""
    a, b, _ = planted(120, 16, 60, 0.5)
    exact = exact_matching(a, b)
    sparse = sparse_matching(a, b, candidates=120)
    assert np.array_equal(sparse.partner, exact.partner)
    assert sparse.pw_mcc == pytest.approx(exact.pw_mcc, abs=1e-9)


@pytest.mark.parametrize(("n", "d"), [(256, 32), (1024, 64)])
def test_sparse_matches_the_exact_assignment_on_planted_dictionaries(n: int, d: int):
    a, b, placed = planted(n, d, n // 2, 0.3, seed=n)
    exact, sparse = exact_matching(a, b), sparse_matching(a, b)
    assert (exact.method, sparse.method) == (EXACT, SPARSE)
    assert np.array_equal(exact.partner[: n // 2], placed)  # the planted pairs are found...
    assert np.array_equal(sparse.partner[: n // 2], placed)  # ...by both
    assert sparse.share_above(0.9) == exact.share_above(0.9)
    assert sparse.pw_mcc <= exact.pw_mcc + 1e-9
    assert sparse.pw_mcc == pytest.approx(exact.pw_mcc, abs=2e-3)
    assert sorted(sparse.partner) == list(range(n))


@pytest.mark.parametrize("match", [exact_matching, sparse_matching], ids=["exact", "sparse"])
def test_a_permuted_copy_is_matched_perfectly(match):
    a, _, _ = planted(300, 24, 0, 0.0)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    matching = match(a, a[perm])
    assert np.array_equal(perm[matching.partner].numpy(), np.arange(300))
    assert matching.pw_mcc == pytest.approx(1.0, abs=1e-6)
    assert matching.share_above(0.9) == 1.0


def test_rows_whose_candidates_are_taken_still_get_a_partner():
    """One candidate each way: greedy leaves rows without a free candidate, and the solver needs
    the completion edges to find a full matching at all."""
    a, b, _ = planted(200, 8, 0, 0.0, seed=3)
    rows = np.arange(200)
    cosines = (a @ b.T).numpy()
    greedy = greedy_matching(rows, cosines.argmax(1), cosines.max(1).astype(np.float64), 200)
    assert (greedy < 0).any()
    matching = sparse_matching(a, b, candidates=1)
    assert sorted(matching.partner) == list(range(200))
    assert matching.pw_mcc >= cosines[rows, matching.partner].mean() - 1e-6


def test_frequency_bins_against_a_hand_count():
    freq = np.array([0.0, 0.0, 2e-4, 5e-4, 3e-3, 0.02, 0.5, 1.0])
    cosine = np.array([0.1, 0.95, 0.99, 0.2, 0.91, 0.5, 0.95, 0.97])
    found = frequency_bins("A", freq, cosine > 0.9)
    bins = [(b.label, b.features, b.share_above) for b in found]
    assert bins == [
        ("never fired", 2, 0.5),
        ("1e-04 to 1e-03", 2, 0.5),
        ("1e-03 to 1e-02", 1, 1.0),
        ("1e-02 to 1e-01", 1, 0.0),
        ("1e-01 to 1e+00", 2, 1.0),
    ]


def sae_folder(folder: Path, n_latents: int = 32, seed: int = 0, perm=None, layer=5) -> Path:
    """A real SAE folder; with `perm`, the SAE of `seed` with its latents permuted."""
    card = SAECard(16, n_latents, ARCHITECTURES["topk"].Options(k=4), layer=layer)
    sae = build_sae(card, seed=seed)
    if perm is not None:
        with torch.no_grad():
            for name in ("w_dec", "w_enc", "b_enc"):
                getattr(sae, name).copy_(getattr(sae, name)[perm])
    save_sae_folder(folder, sae, card)
    return folder


def test_the_command_finds_a_permuted_copy(tmp_path: Path):
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(2))
    a = sae_folder(tmp_path / "a")
    b = sae_folder(tmp_path / "b", perm=perm)
    result = run_vitscope("consistency", str(a), str(b), "--images", "0")
    assert result.returncode == 0, result.stderr
    assert "PW-MCC 1.0000, 100.0% of 32 latents matched above 0.9" in result.stdout
    out = a / "consistency-b"
    saved = json.loads((out / "consistency.json").read_text())
    assert saved["pw_mcc"] == pytest.approx(1.0) and saved["bins"] == []
    assert saved["frequency_a"] == "not measured (--images 0)"
    matches = pq.read_table(out / "matches.parquet").to_pydict()
    assert [int(perm[j]) for j in matches["feature_b"]] == list(range(32))
    assert {p.name for p in out.iterdir()} == {
        "consistency.json",
        "consistency.md",
        "consistency.png",
        "matches.parquet",
    }
    again = run_vitscope("consistency", str(a), str(b), "--images", "0")
    assert again.returncode == 0, again.stderr  # its own folder: written again, no flag


@pytest.mark.parametrize(
    ("other", "found"),
    [
        (dict(n_latents=64), "16, 64 latents, layer 5"),
        (dict(layer=7), "16, 32 latents, layer 7"),
    ],
    ids=["width", "layer"],
)
def test_saes_of_another_shape_are_refused_in_one_line(tmp_path: Path, other: dict, found: str):
    a, b = sae_folder(tmp_path / "a"), sae_folder(tmp_path / "b", **other)
    result = CliRunner().invoke(app, ["consistency", str(a), str(b)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: expected two SAEs of one layer, d_in and width, found d_in 16, 32 latents, "
        f"layer 5 ({a / 'cfg.json'}) and d_in {found} ({b / 'cfg.json'}); compare SAEs trained "
        "on the same layer with the same n_latents (e.g. two seeds)"
    ]
    assert not (a / "consistency-b").exists()


def test_one_sae_twice_is_refused(tmp_path: Path):
    a = sae_folder(tmp_path / "a")
    result = CliRunner().invoke(app, ["consistency", str(a), str(tmp_path / "." / "a")])
    assert result.exit_code == 1 and "expected each run folder once" in result.output


@pytest.fixture(scope="module")
def seed_sweep(tmp_path_factory: pytest.TempPathFactory, small_cache: Path) -> tuple:
    """`vitscope sweep` of two seeds and one other k on the small cache: (its output, runs)."""
    root = tmp_path_factory.mktemp("seeds")
    config = small_config(small_cache, root / "sweep", tokens=8192)
    shared = {k: v for k, v in vars(config).items() if k != "seed"}
    lines = [f"{k} = {json.dumps(v)}" for k, v in shared.items() if isinstance(v, str | int)]
    sae = ["[[sae]]\nseed = 0", "[[sae]]\nseed = 1", "[[sae]]\nk = 8"]
    (root / "sweep.toml").write_text("\n".join([*lines, *sae]) + "\n")
    result = run_vitscope("sweep", str(root / "sweep.toml"))
    assert result.returncode == 0, result.stderr
    return result.stdout, [root / "sweep" / name for name in ("seed0", "seed1", "k8")]


def test_a_sweep_of_seeds_reports_their_consistency(seed_sweep: tuple):
    stdout, (seed0, seed1, _) = seed_sweep
    seeds = [line for line in stdout.splitlines() if line.startswith("seeds:")]
    assert len(seeds) == 1, stdout  # seed0 ~ seed1; the k8 SAE differs in more than its seed
    assert seeds[0].startswith(f"seeds: {seed0} ~ {seed1}: PW-MCC ")


def test_frequencies_of_runs_without_an_analysis_are_counted_on_the_cache(
    seed_sweep: tuple, small_cache: Path, tmp_path: Path
):
    _, (seed0, seed1, _) = seed_sweep
    out = tmp_path / "c"
    result = run_vitscope(
        "consistency", str(seed0), str(seed1), "--images", "40", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "consistency.json").read_text())
    assert saved["frequency_a"].startswith("the first 40 images of ")
    matches = pq.read_table(out / "matches.parquet").to_pydict()
    for run, column in ((seed0, "freq_tokens_a"), (seed1, "freq_tokens_b")):
        expected = brute_force_frequencies(run, small_cache, 40)
        if column == "freq_tokens_b":
            expected = expected[matches["feature_b"]]
        assert np.allclose(matches[column], expected)
        assert sum(b["features"] for b in saved["bins"] if b["run"] == column[-1].upper()) == 64


def test_frequencies_of_an_analysed_run_are_its_analysis(seed_sweep: tuple, tmp_path: Path):
    from vitscope.analysis.analyze import analyze
    from vitscope.analysis.config import AnalyzeConfig

    _, (seed0, seed1, _) = seed_sweep
    run = Path(shutil.copytree(seed0, tmp_path / "seed0"))
    analysis = analyze(AnalyzeConfig(run=str(run), grids=0, device="cpu"))
    out = tmp_path / "c"
    args = ["consistency", str(run), str(seed1), "--images", "0", "--out", str(out)]
    result = run_vitscope(*args)
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "consistency.json").read_text())
    assert saved["frequency_a"] == str(analysis / "features.parquet")
    assert saved["frequency_b"] == "not measured (--images 0)"
    assert {b["run"] for b in saved["bins"]} == {"A"}
    features = pq.read_table(analysis / "features.parquet")
    matches = pq.read_table(out / "matches.parquet")
    assert matches["freq_tokens_a"].to_pylist() == features["freq_tokens"].to_pylist()


def brute_force_frequencies(run: Path, cache_path: Path, images: int) -> np.ndarray:
    """Share of the first `images` images' tokens each latent fires on, one token at a time."""
    from vitscope.cache_spec.store import open_cache

    sae = load_sae(run)
    cache = open_cache(cache_path, layer=3)
    fired, tokens = np.zeros(sae.n_latents), 0
    chunks = [c for c in cache.chunks() if c.first_row < images]
    for _, acts_CTD in read_chunks(cache, 3, chunks):
        for token in acts_CTD.reshape(-1, acts_CTD.shape[-1]):
            codes = sae.encode(token)
            fired[codes.indices[codes.values > 0].numpy()] += 1
            tokens += 1
    return fired / tokens


def test_compare_reports_the_consistency_of_two_seeds(seed_sweep: tuple, tmp_path: Path):
    _, (seed0, seed1, k8) = seed_sweep
    out = tmp_path / "cmp"
    result = run_vitscope("compare", str(seed0), str(seed1), str(k8), "--out", str(out))
    assert result.returncode == 0, result.stderr
    text = (out / "compare.md").read_text()
    assert f"{seed0} ~ {seed1}: PW-MCC " in text
    assert text.count(" ~ ") == 3  # seed0 ~ k8 and seed1 ~ k8 too: one layer and width
