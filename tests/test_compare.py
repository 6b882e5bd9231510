"""`vitscope compare` over SAEs on two layers of the photo cache: one table, one figure, and the
layers' browsers linked to each other (drawn in headless Chromium, and kept when browse re-runs);
the sort-eval columns read one judge and token set's score, and runs of two caches are refused."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from conftest import BROWSER_WAIT_S, run_vitscope, wait_for
from vitscope.analysis.analyze import analyze
from vitscope.analysis.browser import LAYERS_FILE, write_browser
from vitscope.analysis.compare import compare, layer_figure, layer_row, sort_label
from vitscope.analysis.config import AnalyzeConfig
from vitscope.analysis.files import load_analysis
from vitscope.analysis.plots import plt
from vitscope.analysis.sorteval import score
from vitscope.analysis.sorteval_config import SortEvalConfig
from vitscope.analysis.splice import SpliceResult, SpliceScore
from vitscope.train.config import TrainConfig
from vitscope.train.run import train

SPLICE_COSINE = {5: 0.91, 11: 0.83}
SORT_CORRECT = {  # (layer, judge, token): (correct, usable) of 30 pairs
    (5, "clip", "all"): (21, 30),
    (5, "http", "all"): (27, 29),
    (11, "clip", "all"): (0, 0),  # no usable answer: accuracy null, shown blank
    (11, "clip", "cls"): (24, 30),
}


def write_splice(run: Path, cosine: float) -> None:
    """splice.json as `vitscope splice` writes it (SpliceResult.to_json)."""
    scores = [SpliceScore(c, None) for c in (cosine, 0.5, 0.2)]
    result = SpliceResult("ViT-S-32", "none", 5, "all", 23, 0, "", *scores)
    (run / "splice.json").write_text(json.dumps(result.to_json()))


def write_score(run: Path, judge: str, token: str, correct: int, usable: int) -> dict:
    """score.json as `vitscope sorteval` writes it, in its default folder."""
    records = [{"answer": "A", "truth": "A"}] * correct + [{"answer": "B", "truth": "A"}] * (
        usable - correct
    )
    records += [{"answer": None, "truth": "A"}] * (30 - usable)
    result = {**dataclasses.asdict(score(records)), "judge": judge, "token": token, "seed": 0}
    folder = SortEvalConfig(run=str(run), judge=judge, token=token).out_dir  # type: ignore[arg-type]
    folder.mkdir()
    (folder / "score.json").write_text(json.dumps(result))
    return result


@pytest.fixture(scope="module")
def two_layers(
    photo_sae: Path, photo_analysis: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[int, Path]:
    """The photo SAE (layer 5) and one trained and analysed the same way on layer 11, both
    browsed, with splice and sort-eval results, compared by the command into `cmp` beside them."""
    root = tmp_path_factory.mktemp("compare")
    layer5 = shutil.copytree(photo_sae, root / "layer05")
    training = json.loads((photo_sae / "cfg.json").read_text())["training"]
    saved = {
        f.name: training[f.name] for f in dataclasses.fields(TrainConfig)
    }  # not what it measured
    config = TrainConfig(**{**saved, "layer": 11, "out": str(root / "layer11")})
    (layer11,) = train([dataclasses.replace(config, resume=False)])
    analyze(AnalyzeConfig(run=str(layer11), device="cpu"))
    runs = {5: layer5, 11: layer11}
    for layer, run in runs.items():
        browsed = run_vitscope("browse", str(run))
        assert browsed.returncode == 0, browsed.stderr
        write_splice(run, SPLICE_COSINE[layer])
    for (layer, judge, token), (correct, usable) in SORT_CORRECT.items():
        write_score(runs[layer], judge, token, correct, usable)
    result = run_vitscope("compare", str(layer11), str(layer5), "--out", str(root / "cmp"))
    assert result.returncode == 0, result.stderr
    return runs


def test_two_layers_side_by_side(two_layers: dict[int, Path]):
    cmp = two_layers[5].parent / "cmp"
    with open(cmp / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["layer"] for r in rows] == ["5", "11"]  # sorted by layer
    for row in rows:
        assert 0 < float(row["median_frequency"]) <= 1
        assert float(row["dead_fraction"]) >= 0 and row["explained_variance"]
        assert float(row["clipscope_ev"]) != float(row["explained_variance"])  # both, apart
        assert float(row["splice_cosine"]) == SPLICE_COSINE[int(row["layer"])]
        assert row["sort_eval"] == "clip judge, all tokens"  # the default: --judge clip --token all
        morans = load_analysis(Path(row["run"]) / "analysis").features["morans_i"]
        defined = morans.drop_null().to_numpy().astype(np.float64)
        assert len(defined) and float(row["mean_morans_i"]) == pytest.approx(defined.mean())
    saved = json.loads((two_layers[5] / "sorteval-clip-all" / "score.json").read_text())
    assert saved["accuracy"] == pytest.approx(0.7)
    for name in ("accuracy", "low", "high"):
        assert float(rows[0][f"sort_{name}"]) == saved[name]
        assert rows[1][f"sort_{name}"] == ""  # layer 11's score has no usable answer

    table = (cmp / "compare.md").read_text()
    assert table.startswith("| layer | explained variance | CLIP-Scope's explained variance |")
    assert "| 11 |" in table
    assert (
        "| sort eval (clip judge, all tokens; 95% CI) | mean MS | mean Moran's I | run |" in table
    )
    assert f"| 0.700 [{saved['low']:.3f}, {saved['high']:.3f}] |" in table
    assert "nan" not in table.lower()
    picture = np.asarray(Image.open(cmp / "compare.png").convert("L"), np.float32)
    assert picture.std() > 10


def test_judge_and_token_pick_their_score(two_layers: dict[int, Path]):
    """Each (judge, token) reads its own folder, not the alphabetically first sorteval-*."""
    for layer, run in two_layers.items():
        for judge, token in [("clip", "all"), ("clip", "cls"), ("http", "all"), ("human", "all")]:
            row = layer_row(run, judge, token)
            correct, usable = SORT_CORRECT.get((layer, judge, token), (0, 0))
            if usable:
                assert row.sort_accuracy == pytest.approx(correct / usable), (layer, judge, token)
            else:
                assert row.sort_accuracy is row.sort_low is row.sort_high is None
            assert row.sort_eval == sort_label(judge, token)
    out = two_layers[5].parent / "cmp-http"
    result = run_vitscope(
        "compare", *map(str, two_layers.values()), "--out", str(out), "--judge", "http"
    )
    assert result.returncode == 0, result.stderr
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["sort_eval"] for r in rows] == ["http judge, all tokens"] * 2
    assert (
        float(rows[0]["sort_accuracy"]) == pytest.approx(27 / 29) and not rows[1]["sort_accuracy"]
    )


def test_figure_draws_the_splice_cosine_and_sort_eval_interval(two_layers: dict[int, Path]):
    rows = [layer_row(two_layers[layer]) for layer in (5, 11)]
    fig = layer_figure(rows, sort_label("clip", "all"))
    try:
        axes = {ax.get_title().split("\n")[0]: ax for ax in fig.axes}
        (cosine_line,) = axes["splice cosine"].lines
        assert cosine_line.get_xdata().tolist() == [5, 11]
        (morans_line,) = axes["mean Moran's I (spatial coherence)"].lines
        assert morans_line.get_ydata().tolist() == [r.mean_morans_i for r in rows]
        assert cosine_line.get_ydata().tolist() == [SPLICE_COSINE[5], SPLICE_COSINE[11]]
        sort_ax = axes["sort-eval accuracy (95% CI)"]
        assert sort_ax.get_title().endswith("clip judge, all tokens")
        (bars,) = [c for c in sort_ax.containers if isinstance(c, ErrorbarContainer)]
        line, _, (ranges,) = bars.lines
        assert line.get_xdata().tolist() == [5]  # layer 11 has no usable answer: no point
        assert line.get_ydata().tolist() == [rows[0].sort_accuracy]
        np.testing.assert_allclose(
            ranges.get_segments()[0], [[5, rows[0].sort_low], [5, rows[0].sort_high]]
        )
    finally:
        plt.close(fig)


def test_browsers_link_the_layers_and_browse_keeps_the_links(
    two_layers: dict[int, Path], chromium: webdriver.Chrome
):
    layer5, layer11 = two_layers[5], two_layers[11]
    written = (layer5 / "browser" / LAYERS_FILE).read_text()
    parsed = json.loads(written.removeprefix("VS.layers = ").removesuffix(";\n"))
    assert [(link["layer"], link["here"]) for link in parsed] == [(5, True), (11, False)]
    assert (layer5 / "browser" / parsed[1]["href"]).resolve() == layer11 / "browser" / "index.html"
    # `vitscope browse` again (what the command calls): compare's links are still there.
    write_browser(load_analysis(layer5 / "analysis"), layer5 / "browser")
    assert (layer5 / "browser" / LAYERS_FILE).read_text() == written

    chromium.get((layer5 / "browser" / "index.html").as_uri())
    (link,) = wait_for(chromium, "#layers a")
    assert chromium.find_element(By.CSS_SELECTOR, "#layers strong").text == "layer 5"
    assert link.text == "layer 11"
    link.click()
    WebDriverWait(chromium, BROWSER_WAIT_S).until(
        lambda d: d.find_element(By.ID, "title").text.endswith("· layer 11")
    )
    assert chromium.current_url.startswith((layer11 / "browser" / "index.html").as_uri())
    assert [a.text for a in wait_for(chromium, "#layers a")] == ["layer 5"]


def test_runs_of_two_caches_are_refused(photo_sae: Path, photo_analysis: Path, tmp_path: Path):
    elsewhere = shutil.copytree(photo_sae, tmp_path / "elsewhere")
    meta_path = elsewhere / "analysis" / "meta.json"
    meta = json.loads(meta_path.read_text())
    other_cache = str(tmp_path / "other-cache")
    meta_path.write_text(json.dumps({**meta, "cache": other_cache}))
    with pytest.raises(ValueError) as refused:
        compare([photo_sae, elsewhere], tmp_path / "cmp")
    message = str(refused.value)
    assert "\n" not in message and "compare runs of one cache" in message
    for text in (str(photo_sae), meta["cache"], str(elsewhere), other_cache):
        assert text in message
    assert not (tmp_path / "cmp").exists()


def test_the_same_run_twice_is_refused(photo_sae: Path, tmp_path: Path):
    """In any spelling: duplicate rows would compare a run with itself."""
    out = ["--out", str(tmp_path / "cmp")]
    result = run_vitscope("compare", str(photo_sae), photo_sae.name, *out, cwd=photo_sae.parent)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {photo_sae.resolve()}: expected each run folder once, found {photo_sae} and "
        f"{photo_sae.name}, one folder; name each run once"
    ]
    assert not (tmp_path / "cmp").exists()
