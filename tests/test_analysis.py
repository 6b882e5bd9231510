"""`vitscope analyze`: streaming statistics and top images equal a brute-force computation, an
interrupted pass resumes, images come back from moved shards, and the pictures show something."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import vitscope
from conftest import (
    NO_CLS,
    REGISTERS,
    brute_morans_i,
    cache_config,
    run_vitscope,
    small_config,
    synthetic_cache,
)
from vitscope.analysis import analyze as analyze_module
from vitscope.analysis.analyze import analyze
from vitscope.analysis.compare import layer_row
from vitscope.analysis.config import AnalyzeConfig
from vitscope.analysis.files import Analysis, load_analysis
from vitscope.analysis.plots import (
    feature_grid_figure,
    morans_i_figure,
    mse_by_token_figure,
    panel_windows,
    plot_analysis,
    plot_frequencies_figure,
)
from vitscope.analysis.spatial import MAX_SHARE, MIN_PATCHES
from vitscope.analysis.stats import FeatureAccumulator
from vitscope.cache_spec import open_cache
from vitscope.cache_spec.tokens import TokenLayout
from vitscope.pipeline.run import cache
from vitscope.pipeline.shards import list_shards
from vitscope.support.run_log import read_log
from vitscope.train.report import report_figure
from vitscope.train.run import train


@pytest.fixture(scope="module")
def brute_force(photo_sae: Path, reference_cache: Path) -> tuple[np.ndarray, list[int]]:
    """Every committed row's dense latent activations (N, T, F), and the rows: the small cache
    lets us hold what the streaming pass must never hold."""
    cache = open_cache(reference_cache)
    rows = [r for ref in cache.chunks() for r in range(ref.first_row, ref.first_row + ref.n_rows)]
    sae = vitscope.load_sae(photo_sae)
    codes = sae.encode(cache.read_rows(5, rows))
    return codes.dense().numpy(), rows


def test_statistics_equal_a_brute_force_pass(photo_analysis: Path, brute_force):
    dense_NTF, rows = brute_force
    analysis = load_analysis(photo_analysis)
    features = analysis.features.to_pydict()
    fired_NTF = dense_NTF > 0
    assert analysis.meta.images_seen == len(rows) and analysis.meta.n_tokens == 50
    assert features["fire_tokens"] == fired_NTF.sum(axis=(0, 1)).tolist()
    assert features["fire_images"] == fired_NTF.any(axis=1).sum(axis=0).tolist()
    np.testing.assert_allclose(features["max_act"], dense_NTF.max(axis=(0, 1)), rtol=1e-6)
    mean = dense_NTF.sum(axis=(0, 1)) / np.maximum(fired_NTF.sum(axis=(0, 1)), 1)
    np.testing.assert_allclose(features["mean_act"], mean, rtol=1e-5)
    np.testing.assert_allclose(features["freq_tokens"], fired_NTF.mean(axis=(0, 1)), rtol=1e-9)


def test_spatial_coherence_equals_the_double_loop_over_every_image(
    photo_analysis: Path, brute_force
):
    """features.parquet's Moran's I: the mean over the images that count of the textbook I of
    the patch grid (CLS left out), for every feature; null where no image counts."""
    dense_NTF, _ = brute_force
    measured = checked_morans_i(load_analysis(photo_analysis), dense_NTF)
    assert 10 < measured < 64  # some features measured, some not


def checked_morans_i(analysis: Analysis, dense_NTF: np.ndarray) -> int:
    """Check every feature's Moran's I against the double loop over the (rows, cols) patches of
    the analysis's layout; returns how many features have one."""
    layout = analysis.meta.layout
    assert layout is not None
    rows, cols = layout.grid
    patches_NF = dense_NTF[:, layout.patches].transpose(0, 2, 1)
    patches_NFRC = patches_NF.reshape(*patches_NF.shape[:2], rows, cols)
    features = analysis.features.to_pydict()
    measured = 0
    for feature in range(analysis.meta.n_features):
        values = [
            brute_morans_i(patches)
            for patches in patches_NFRC[:, feature]
            if MIN_PATCHES <= np.count_nonzero(patches) <= int(MAX_SHARE * rows * cols)
        ]
        assert features["morans_images"][feature] == len(values)
        if values:
            assert features["morans_i"][feature] == pytest.approx(
                np.mean(values), rel=1e-4, abs=1e-5
            )
            measured += 1
        else:
            assert features["morans_i"][feature] is None
    return measured


def test_top_images_are_the_highest_activations_with_their_token_maps(
    photo_analysis: Path, brute_force
):
    dense_NTF, rows = brute_force
    analysis = load_analysis(photo_analysis)
    peak_NF = np.where(dense_NTF > 0, dense_NTF, -np.inf).max(axis=1)
    checked = 0
    for feature in range(analysis.meta.n_features):
        top = analysis.top_of(feature)
        expected = np.sort(peak_NF[:, feature][np.isfinite(peak_NF[:, feature])])[::-1][:9]
        np.testing.assert_allclose([t["value"] for t in top], expected, rtol=1e-6)
        heat = analysis.heatmaps(feature)
        for rank, item in enumerate(top):
            image = rows.index(item["row"])
            assert peak_NF[image, feature] == pytest.approx(item["value"], rel=1e-6)
            np.testing.assert_allclose(heat[rank], dense_NTF[image, :, feature], atol=2e-3)
            checked += 1
        assert not heat[len(top) :].any()
    assert checked > 100


def test_an_interrupted_pass_resumes_where_it_stopped(
    photo_sae: Path, reference_cache: Path, photo_analysis: Path, tmp_path: Path, monkeypatch
):
    config = AnalyzeConfig(
        run=str(photo_sae),
        cache=str(reference_cache),
        out=str(tmp_path / "analysis"),
        checkpoint_every=2,
        device="cpu",
    )
    real_read = analyze_module.read_chunks
    served: list[int] = []

    def killed_after_five(cache, layer, refs, threads):
        for ref, chunk in real_read(cache, layer, refs, threads):
            if len(served) == 5:
                raise KeyboardInterrupt
            served.append(ref.index)
            yield ref, chunk

    monkeypatch.setattr(analyze_module, "read_chunks", killed_after_five)
    with pytest.raises(KeyboardInterrupt):
        analyze(config)
    meta = json.loads((tmp_path / "analysis" / "meta.json").read_text())
    assert (meta["chunks_done"], meta["complete"]) == (4, False)

    served.clear()
    monkeypatch.setattr(analyze_module, "read_chunks", real_read)
    resumed = load_analysis(analyze(dataclasses.replace(config, resume=True)))
    whole = load_analysis(photo_analysis)
    assert resumed.features.equals(whole.features)
    assert resumed.top_images.equals(whole.top_images)
    assert not (tmp_path / "analysis" / "state.safetensors").exists()


def test_pictures_show_what_they_should(photo_analysis: Path, photo_sae: Path):
    pictures = plot_analysis(photo_analysis, grids=2)
    names = [p.name for p in pictures]
    assert names[:3] == ["frequencies.png", "mse_by_token.png", "morans_i.png"]
    assert len(names) == 5
    for path in pictures:
        pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
        assert pixels.std() > 10, f"{path} is nearly blank"
    figure = mse_by_token_figure(photo_sae, load_analysis(photo_analysis).meta.cache_layout)
    panels = [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == len(read_log(photo_sae)) == 2  # one per logged window
    assert all(len(ax.child_axes) == 1 for ax in panels)  # CLS beside each
    assert len(figure.axes) == len(panels) + 1  # one colour scale for all

    analysis = load_analysis(photo_analysis)
    histograms = plot_frequencies_figure(analysis).axes
    assert [ax.get_xlabel() for ax in histograms] == [
        "log10 firing frequency over tokens",
        "log10 firing frequency over images",
    ]
    assert all(sum(p.get_height() for p in ax.patches) > 0 for ax in histograms)
    widest = int(np.argmax(analysis.features["fire_images"].to_numpy()))
    grid = feature_grid_figure(analysis, widest)
    shown = [ax for ax in grid.axes if ax.get_images()]
    assert len(shown) == len(analysis.top_of(widest)) == 9  # a 3x3 grid, all filled
    assert all(len(ax.get_images()) == 2 for ax in shown)  # the photo and its heatmap
    captions = [ax.get_xlabel() for ax in shown]
    assert all(captions) and len(set(captions)) == 9


def test_an_analysis_from_before_morans_i_still_draws_and_compares(
    photo_analysis: Path, photo_sae: Path, tmp_path: Path
):
    """Version 1.1 folders have no Moran's I: no histogram, a blank cell in compare; nor a
    token layout: their patch_grid is the side of the square after CLS."""
    run = shutil.copytree(photo_sae, tmp_path / "run", ignore=shutil.ignore_patterns("analysis"))
    old = shutil.copytree(photo_analysis, run / "analysis")
    features = pq.read_table(old / "features.parquet").drop(["morans_i", "morans_images"])
    pq.write_table(features, old / "features.parquet")
    meta = json.loads((old / "meta.json").read_text())
    assert meta.pop("prefix_tokens") == ["cls"] and meta["patch_grid"] == [7, 7]
    (old / "meta.json").write_text(json.dumps({**meta, "patch_grid": 7, "analysis_version": "1.1"}))
    assert load_analysis(old).meta.layout == TokenLayout(("cls",), (7, 7))
    names = [p.name for p in plot_analysis(old, grids=1)]
    assert names == ["frequencies.png", "mse_by_token.png", names[2]]
    assert names[2].startswith("feature_")
    row = layer_row(run)
    assert row.mean_morans_i is None and row.median_frequency is not None


def test_checkpoints_choose_the_mse_panels():
    template = read_log(Path(__file__).parent / "data" / "run-v0")[0]
    log = [dataclasses.replace(template, tokens=t) for t in range(100, 2100, 100)]  # 20 windows
    assert [w.tokens for w in panel_windows(log, 500)] == [500, 1000, 1500, 2000]
    assert [w.tokens for w in panel_windows(log, 800)] == [800, 1600, 2000]
    thinned = panel_windows(log, 10**9)  # no checkpoint: every window, thinned evenly
    assert len(thinned) == 16 and thinned[0] is log[0] and thinned[-1] is log[-1]
    assert panel_windows(log[:16], 500) == log[:16]  # all windows while they fit


def record_shards_at(cache: Path, folder: Path | None) -> None:
    """Edit a cache as if its shards had been read from `folder`, in its attributes and every
    commit record (None: as caches before spec 1.1 recorded nothing)."""
    meta = cache / "zarr.json"
    data = json.loads(meta.read_text())
    attrs = data["attributes"]["vitscope_cache"]
    records = [(path, json.loads(path.read_text())) for path in cache.glob("shards/*.commit.json")]
    assert records and all(record["source_folder"] for _, record in records)
    for fields, name in [(attrs, "source_shards"), *((r, "source_folder") for _, r in records)]:
        del fields[name]
        if folder is not None:
            fields[name] = str(folder)
    meta.write_text(json.dumps(data))
    for path, record in records:
        path.write_text(json.dumps(record))


def test_moved_shards_work_with_shards_and_fail_in_one_line_without(
    photo_sae: Path, reference_cache: Path, shards: Path, tmp_path: Path
):
    cache = shutil.copytree(reference_cache, tmp_path / "cache")
    record_shards_at(cache, tmp_path / "gone")
    moved = shutil.copytree(shards, tmp_path / "moved")
    args = ["analyze", str(photo_sae), "--cache", str(cache), "--grids", "1"]

    failed = run_vitscope(*args, "--out", str(tmp_path / "a1"))
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'gone'}: the cache's shard folder is not there; pass --shards DIR "
        "where its shards are now"
    ]
    assert not (tmp_path / "a1").exists()  # refused before the pass, not after it

    # Relative paths, as a user types them; meta.json must still open from anywhere.
    relative = ["analyze", "run", "--cache", "cache", "--grids", "1", "--out", "a2"]
    relative += ["--shards", "moved"]
    shutil.copytree(photo_sae, tmp_path / "run")
    worked = run_vitscope(*relative, cwd=tmp_path)
    assert worked.returncode == 0, worked.stderr
    assert list((tmp_path / "a2" / "grids").glob("feature_*.png"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    features = load_analysis(tmp_path / "a2").features["fire_images"].to_numpy()
    grid = ["grid", str(tmp_path / "a2"), "--feature", str(int(np.argmax(features)))]
    drawn = run_vitscope(*grid, "--shards", str(moved), cwd=elsewhere)
    assert drawn.returncode == 0, drawn.stderr

    again = run_vitscope(*relative, cwd=tmp_path)
    assert again.returncode == 1 and "--overwrite to start again" in again.stderr
    meta = (tmp_path / "a2" / "meta.json").read_text()
    resumed = run_vitscope(*relative, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr  # a finished analysis: only the pictures
    assert (tmp_path / "a2" / "meta.json").read_text() == meta
    (tmp_path / "a2" / "stale.txt").write_text("from before")
    fresh = run_vitscope(*relative, "--overwrite", cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    assert not (tmp_path / "a2" / "stale.txt").exists()  # a fresh pass, nothing old mixed in
    assert load_analysis(tmp_path / "a2").meta.complete


def test_a_cache_that_never_recorded_its_shards_asks_for_them(
    photo_sae: Path, reference_cache: Path, shards: Path, tmp_path: Path
):
    cache = shutil.copytree(reference_cache, tmp_path / "cache")
    record_shards_at(cache, None)  # as caches before spec 1.1
    args = ["analyze", str(photo_sae), "--cache", str(cache), "--grids", "1"]
    failed = run_vitscope(*args, "--out", str(tmp_path / "a1"))
    assert failed.returncode == 1
    (line,) = failed.stderr.strip().splitlines()
    assert line.startswith(f"error: {cache}: the cache does not record where its shards")
    assert line.endswith("pass --shards DIR")
    worked = run_vitscope(*args, "--out", str(tmp_path / "a2"), "--shards", str(shards))
    assert worked.returncode == 0, worked.stderr


def test_a_shard_that_changed_names_the_missing_key(
    photo_analysis: Path, shards: Path, tmp_path: Path
):
    from vitscope.analysis.images import ImageSourceError, read_images

    analysis = load_analysis(photo_analysis)
    top = analysis.top_of(int(np.argmax(analysis.features["fire_images"].to_numpy())))
    replaced = shutil.copytree(shards, tmp_path / "shards")
    with tarfile.open(replaced / top[0]["shard"], "w"):
        pass  # the same name, none of its samples
    with pytest.raises(ImageSourceError, match=f"no sample with key {top[0]['key']}"):
        read_images(open_cache(analysis.meta.cache), [top[0]["row"]], replaced)


def test_a_cache_grown_from_two_shard_folders_reads_every_image_back(shards: Path, tmp_path: Path):
    """Each commit record names its shard's folder (spec 1.3): no --shards needed, and the image
    read back for a row is the one its shard holds under the row's key."""
    from vitscope.analysis.images import read_images, row_sources

    first, second = tmp_path / "first", tmp_path / "second"
    *early, late = list_shards(shards)
    for folder, tars in [(first, early), (second, [late])]:
        folder.mkdir()
        for tar in tars:
            shutil.copy(tar, folder)
        cache(cache_config(folder, tmp_path / "cache"))
    grown = open_cache(tmp_path / "cache")
    assert grown.attrs.source_shards == str(first)
    folders = [commit.source_folder for commit in grown.committed.values()]
    assert folders == [str(first)] * len(early) + [str(second)]

    sources = row_sources(grown)
    images = read_images(grown, list(sources))
    assert sorted(images) == sorted(sources) and {s for s, _, _ in sources.values()} == {
        tar.name for tar in (*early, late)
    }
    for row, (shard, key, _) in sources.items():
        with tarfile.open(shards / shard) as tar:  # the shard as img2dataset wrote it
            original = Image.open(tar.extractfile(f"{key}.jpg")).convert("RGB")
        assert np.array_equal(np.asarray(images[row]), np.asarray(original)), row


def test_the_passs_state_does_not_grow_with_the_cache(
    photo_sae: Path, reference_cache: Path, tmp_path: Path, monkeypatch
):
    """What the pass holds between chunks: its accumulator, the same size after one chunk as
    after all of them (memory over real cache sizes: bench/analyze_throughput.py)."""
    sizes: list[int] = []
    real_add = FeatureAccumulator.add

    def measured_add(self, *args):
        real_add(self, *args)
        sizes.append(sum(t.nbytes for t in self.tensors().values()))

    monkeypatch.setattr(FeatureAccumulator, "add", measured_add)
    config = AnalyzeConfig(run=str(photo_sae), cache=str(reference_cache), device="cpu")
    analysis = load_analysis(analyze(dataclasses.replace(config, out=str(tmp_path / "a"))))
    assert len(sizes) == analysis.meta.chunks_total > 4 and len(set(sizes)) == 1
    assert analysis.heatmaps(0).shape == (9, 50)


def test_any_features_grid_from_the_command_line(photo_analysis: Path, tmp_path: Path):
    features = load_analysis(photo_analysis).features.to_pydict()
    live = features["fire_images"].index(max(features["fire_images"]))
    out = tmp_path / "grid.png"
    drawn = run_vitscope("grid", str(photo_analysis), "--feature", str(live), "--out", str(out))
    assert drawn.returncode == 0, drawn.stderr
    assert np.asarray(Image.open(out).convert("L"), dtype=np.float32).std() > 10
    if 0 in features["fire_images"]:
        dead = features["fire_images"].index(0)
        refused = run_vitscope("grid", str(photo_analysis), "--feature", str(dead))
        assert refused.returncode == 1 and "never fired" in refused.stderr
    beyond = run_vitscope("grid", str(photo_analysis), "--feature", "64")
    assert beyond.returncode == 1
    assert beyond.stderr.strip() == "error: feature must be below 64, not 64"


@pytest.mark.parametrize(
    ("damage", "found"), [("delete", "found no file"), ("truncate", "found bytes that do not")]
)
def test_damaged_heatmaps_are_one_line_not_an_empty_picture(
    photo_sae: Path, photo_analysis: Path, tmp_path: Path, damage: str, found: str
):
    """Zarr reads a missing chunk as zeros: grid and browse drew heatmaps of "0 to 0"."""
    analysis = Path(shutil.copytree(photo_analysis, tmp_path / "analysis"))
    chunk = analysis / "heatmaps.zarr" / "c" / "0" / "0" / "0"
    if damage == "delete":
        chunk.unlink()
    else:
        chunk.write_bytes(chunk.read_bytes()[:-30])
    features = load_analysis(analysis).features["fire_images"].to_numpy()
    live = str(int(np.argmax(features)))
    grid = run_vitscope("grid", str(analysis), "--feature", live, "--out", str(tmp_path / "g.png"))
    site = ["--analysis", str(analysis), "--out", str(tmp_path / "site")]
    browse = run_vitscope("browse", str(photo_sae), *site)
    for result in (grid, browse):
        assert result.returncode == 1
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(
            f"error: {chunk}: expected the heatmaps of features 0..63 of the analysis in "
            f"{analysis}, {found}"
        ), line
        assert line.endswith(f"analyse again: `vitscope analyze {photo_sae} --overwrite`")
    assert not (tmp_path / "g.png").exists()


def test_a_layer_other_than_the_saes_is_refused(photo_sae: Path, tmp_path: Path):
    """The photo SAE reads layer 5; layer 2's activations would run through it without a word."""
    out = tmp_path / "analysis"
    result = run_vitscope("analyze", str(photo_sae), "--layer", "2", "--out", str(out))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {photo_sae}: --layer 2, but the SAE was trained on layer 5 (its cfg.json says); "
        "its features read nothing meaningful from another layer; leave out --layer (or pass "
        "--layer 5), or analyse an SAE of layer 2"
    ]
    assert not out.exists()


@pytest.fixture(scope="module", params=[REGISTERS, NO_CLS], ids=["registers", "no-cls"])
def layout_analysis(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, np.ndarray]:
    """Another backbone's token layout end to end: an SAE trained on a synthetic cache that
    records it, and its analysis; returns the run, the analysis folder, and the dense codes
    (N, T, F) of every row."""
    work = tmp_path_factory.mktemp("layout")
    path = synthetic_cache(work / "cache", n_images=64, d_model=16, layout=request.param)
    (run,) = train([small_config(path, work / "run", tokens=8192)])
    folder = analyze(AnalyzeConfig(run=str(run), cache=str(path), device="cpu", grids=0))
    acts_NTD = open_cache(path).read_rows(3, list(range(64)))
    return run, folder, vitscope.load_sae(run).encode(acts_NTD).dense().numpy()


def test_an_analysis_records_the_caches_layout_and_measures_on_its_grid(layout_analysis):
    _, folder, dense_NTF = layout_analysis
    analysis = load_analysis(folder)
    layout = open_cache(analysis.meta.cache).attrs.token_layout
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["patch_grid"] == list(layout.grid) and meta["prefix_tokens"] == list(layout.prefix)
    assert analysis.meta.layout == analysis.meta.cache_layout == layout  # token set: all
    assert analysis.meta.n_tokens == layout.n_tokens
    assert checked_morans_i(analysis, dense_NTF) > 0
    rows, cols = layout.grid
    assert f"on the {rows}x{cols} grid" in morans_i_figure(analysis).texts[0].get_text()


def test_mse_by_token_and_the_report_draw_prefix_tokens_beside_the_grid(layout_analysis):
    """Each prefix token (CLS, registers) its own labelled cell, the patches rows x cols."""
    run, folder, _ = layout_analysis
    layout = load_analysis(folder).meta.cache_layout
    mse = np.asarray(read_log(run)[-1].heldout.mse_by_token)
    panels = [ax for ax in mse_by_token_figure(run, layout).axes if ax.get_label() != "<colorbar>"]
    report = report_figure(run, layout)
    panels.append(next(ax for ax in report.axes if ax.get_title().startswith("MSE by token")))
    for panel in (panels[-2], panels[-1]):  # both the last window
        (grid,) = panel.get_images()
        np.testing.assert_allclose(grid.get_array(), mse[layout.patches].reshape(layout.grid))
        assert [cell.get_ylabel() for cell in panel.child_axes] == list(layout.prefix)
        cells = [cell.get_images()[0].get_array()[0, 0] for cell in panel.child_axes]
        np.testing.assert_allclose(cells, mse[: layout.n_prefix])
    assert names_of(plot_analysis(folder, grids=0))[1] == "mse_by_token.png"


def names_of(paths: list[Path]) -> list[str]:
    return [path.name for path in paths]
