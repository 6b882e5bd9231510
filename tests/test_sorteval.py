"""The sort eval: its sampling rules hold and are seeded, the score's interval is right, and the
clip and http judges run end to end, the http one through faults and a kill."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from openai_server import serve_openai
from PIL import Image

from conftest import NO_CLS, run_vitscope, synthetic_cache
from vitscope.analysis.judge_clip import ClipJudge
from vitscope.analysis.sorteval import (
    GRID,
    answered,
    compose_grid,
    feature_peaks,
    record_answers,
    sample_trials,
    score,
    wilson_interval,
)
from vitscope.cache_spec.store import open_cache
from vitscope.saes.load import load_sae
from vitscope.support.errors import BadSetting

KEY = "sk-judge-secret-for-tests"


def synthetic_peaks(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """200 images x 12 features, each firing on a random third of the images."""
    rng = np.random.default_rng(seed)
    peaks = rng.random((200, 12)) * (rng.random((200, 12)) < 0.33)
    return peaks.astype(np.float32), np.arange(1000, 1200), np.arange(100, 112)


def test_sampling_rules_hold_and_depend_only_on_the_seed():
    peaks, rows, features = synthetic_peaks()
    trials = sample_trials(peaks, rows, features, pairs=60, seed=3)
    assert len(trials) == 60 and [t.pair for t in trials] == list(range(60))
    column = {int(f): i for i, f in enumerate(features)}
    image = {int(r): i for i, r in enumerate(rows)}
    for t in trials:
        a, b = column[t.feature_a], column[t.feature_b]
        assert a != b and len(t.rows_a) == len(t.rows_b) == GRID
        assert sorted(t.rows_a) == sorted(rows[np.argsort(-peaks[:, a])[:GRID]].tolist())
        assert t.query not in t.rows_a and t.query not in t.rows_b
        true, other = (a, b) if t.truth == "A" else (b, a)
        q = image[t.query]
        assert peaks[q, true] > 0 and peaks[q, other] == 0
    assert {t.truth for t in trials} == {"A", "B"}
    assert sample_trials(peaks, rows, features, pairs=60, seed=3) == trials
    assert sample_trials(peaks, rows, features, pairs=60, seed=4) != trials


def test_too_few_live_features_is_one_line():
    peaks = np.zeros((30, 3), dtype=np.float32)
    peaks[:, 0] = 1.0
    with pytest.raises(ValueError, match=r"^only 1 feature\(s\) fire on more than 9 images"):
        sample_trials(peaks, np.arange(30), np.arange(3), pairs=5, seed=0)


def test_too_few_pairs_with_a_query_warn_and_none_is_one_line(capsys: pytest.CaptureFixture):
    """59 features fire on the same 100 images, one on the other 100: only pairs with that one
    have a query that fires for one feature only."""
    peaks = np.zeros((200, 60), dtype=np.float32)
    peaks[:100, :59] = np.linspace(1, 2, 100)[:, None]
    peaks[100:, 59] = 1.0
    trials = sample_trials(peaks, np.arange(200), np.arange(60), pairs=40, seed=0)
    assert 0 < len(trials) < 40 and all(59 in (t.feature_a, t.feature_b) for t in trials)
    assert f"warning: only {len(trials)} of 40 pairs found a query" in capsys.readouterr().err
    peaks[100:, 59] = 0.0
    peaks[:100, 59] = 1.0  # every feature fires on the same images: no query anywhere
    with pytest.raises(ValueError, match=r"^only 0 of 5 pairs found a query image"):
        sample_trials(peaks, np.arange(200), np.arange(60), pairs=5, seed=0)


def test_a_torn_last_line_is_cut_before_the_next_answer_is_appended(tmp_path: Path):
    peaks, rows, features = synthetic_peaks()
    trials = sample_trials(peaks, rows, features, pairs=3, seed=0)
    path = tmp_path / "answers.jsonl"
    record_answers(path, trials, iter([(0, "A")]))
    with open(path, "a") as f:
        f.write('{"pair": 1, "feature_a": 10')  # a kill in the middle of a line
    assert list(answered(path)) == [0]
    record_answers(path, trials, iter([(1, "B"), (2, None)]))
    lines = path.read_text().splitlines()
    assert [json.loads(line)["pair"] for line in lines] == [0, 1, 2]
    assert score(list(answered(path).values())).trials == 3


def test_no_usable_answer_scores_none_not_nan():
    result = score([{"answer": None, "truth": "A"}])
    assert result.accuracy is None and (result.low, result.high) == (0.0, 1.0)
    assert json.loads(json.dumps(result.accuracy)) is None
    assert result.summary() == "no usable answer among 1 pairs"


def test_cls_peaks_are_the_cls_tokens_codes(photo_analysis: Path, reference_cache: Path):
    sae = load_sae(photo_analysis.parent)
    cache = open_cache(reference_cache)
    features = np.arange(0, sae.n_latents, 3)
    peaks, rows = feature_peaks(sae, cache, 5, features, "cls")
    acts = cache.read_rows(5, rows.tolist())[:, 0]
    dense = torch.zeros(len(rows), sae.n_latents)
    codes = sae.encode(acts)
    dense.scatter_(1, codes.indices, codes.values.float().clamp_min(0))
    np.testing.assert_allclose(peaks, dense[:, features].numpy(), rtol=1e-5, atol=1e-6)
    every, _ = feature_peaks(sae, cache, 5, features, "all")
    assert (every >= peaks - 1e-6).all() and (every > peaks + 1e-6).any()


def test_cls_peaks_of_a_model_without_cls_are_one_line_before_any_reading(
    photo_analysis: Path, tmp_path: Path
):
    """SigLIP's layout has no CLS: --token cls cannot mean token 0, a patch."""
    cache = open_cache(synthetic_cache(tmp_path / "cache", n_images=8, layout=NO_CLS))
    with pytest.raises(BadSetting, match="no CLS token") as caught:
        feature_peaks(load_sae(photo_analysis.parent), cache, 3, np.arange(4), "cls")
    assert "\n" not in str(caught.value)


def test_compose_grid_places_nine_images_in_reading_order():
    colours = [(28 * i, 255 - 28 * i, (90 * i) % 256) for i in range(9)]
    grid = compose_grid([Image.new("RGB", (30, 50), c) for c in colours], cell=40)
    assert grid.size == (120, 120)
    for i, colour in enumerate(colours):
        assert grid.getpixel(((i % 3) * 40 + 20, (i // 3) * 40 + 20)) == colour
    assert grid.getpixel((1, 1)) == (255, 255, 255)  # the gutter between cells


def test_the_clip_judge_sends_a_query_to_the_grid_it_looks_like(tower):
    """Reddish and bluish photos (noise over a colour): even a seeded random CLIP places a
    query with the grid of its colour."""
    rng = np.random.default_rng(0)

    def photo(colour: tuple[int, int, int]) -> Image.Image:
        noise = rng.integers(-40, 40, (64, 64, 3))
        return Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8))

    red, blue = (200, 40, 40), (40, 40, 200)
    judge = ClipJudge(tower)
    reds, blues = [photo(red) for _ in range(GRID)], [photo(blue) for _ in range(GRID)]
    assert [judge.answer(reds, blues, photo(red)) for _ in range(3)] == ["A"] * 3
    assert [judge.answer(reds, blues, photo(blue)) for _ in range(3)] == ["B"] * 3
    assert judge.answer(blues, reds, photo(red)) == "B"


def test_wilson_interval():
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_clip_judge_end_to_end_and_a_rerun_costs_nothing(photo_analysis: Path, tmp_path: Path):
    run = photo_analysis.parent
    args = ["sorteval", str(run), "--pairs", "12", "--out", str(tmp_path / "eval")]
    first = run_vitscope(*args)
    assert first.returncode == 0, first.stderr
    assert "sort eval (clip judge, all tokens): accuracy" in first.stdout
    answers = (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()
    assert len(answers) == 12 and all(json.loads(a)["answer"] in ("A", "B") for a in answers)
    scored = json.loads((tmp_path / "eval" / "score.json").read_text())
    assert scored["trials"] == scored["usable"] == 12 and scored["low"] <= scored["accuracy"]

    again = run_vitscope(*args)
    assert again.returncode == 0 and "0 of 12 pairs to judge" in again.stderr
    assert (tmp_path / "eval" / "answers.jsonl").read_text().splitlines() == answers

    other = run_vitscope(*args[:-2], "--seed", "1", "--out", str(tmp_path / "eval"))
    assert other.returncode == 1 and "use a new --out for other settings" in other.stderr


def test_http_judge_through_faults_and_a_kill(photo_analysis: Path, tmp_path: Path):
    run = photo_analysis.parent
    out = tmp_path / "eval"
    env = {**os.environ, "VITSCOPE_JUDGE_API_KEY": KEY, "no_proxy": "*"}
    with serve_openai(KEY) as server:
        server.faults = ["429", "500", "malformed", "garbled"]
        args = [
            sys.executable,
            "-m",
            "vitscope",
            "sorteval",
            str(run),
            "--judge",
            "http",
            "--judge-url",
            server.url,
            "--pairs",
            "12",
            "--out",
            str(out),
        ]
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        answers = out / "answers.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if answers.exists() and len(answers.read_text().splitlines()) >= 5:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        _, killed_stderr = proc.communicate(timeout=30)
        assert b"retry" in killed_stderr and KEY.encode() not in killed_stderr
        before = len(answers.read_text().splitlines())
        assert 5 <= before < 12
        asked_before = len(server.requests)

        resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert f"{12 - before} of 12 pairs to judge" in resumed.stderr
        assert len(server.requests) - asked_before == 12 - before
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    assert sorted(r["pair"] for r in records) == list(range(12))
    scored = json.loads((out / "score.json").read_text())
    assert scored["unusable"] == 2 and scored["usable"] == 10  # malformed and garbled
    assert KEY not in resumed.stdout + resumed.stderr


def test_the_human_game_in_chromium_saves_answers_the_command_scores(
    photo_analysis: Path, chromium, tmp_path: Path
):
    from selenium.webdriver.common.by import By

    run = photo_analysis.parent
    args = ["sorteval", str(run), "--judge", "human", "--pairs", "4", "--out", str(tmp_path)]
    written = run_vitscope(*args)
    assert written.returncode == 0, written.stderr
    page = tmp_path / "game" / "sortgame.html"
    trials = json.loads(
        (tmp_path / "game" / "data" / "trials.js").read_text().removeprefix("VS.trials = ")[:-2]
    )
    assert "truth" not in trials["pairs"][0]  # the page never knows the answer
    chromium.get(page.as_uri())
    clicked = []
    for i in range(4):
        assert chromium.find_element(By.ID, "progress").text == f"{i} of 4 answered"
        query = chromium.find_element(By.ID, "query")
        assert chromium.execute_script("return arguments[0].naturalWidth", query) > 0
        letter = "A" if i % 2 == 0 else "B"
        chromium.find_element(By.ID, f"answer-{letter.lower()}").click()
        clicked.append(letter)
    assert chromium.find_element(By.ID, "done").is_displayed()
    assert chromium.find_element(By.ID, "command").text == trials["command"]
    saved = chromium.download_dir / "answers.jsonl"
    saved.unlink(missing_ok=True)
    chromium.find_element(By.ID, "save").click()
    deadline = time.monotonic() + 20
    while not saved.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [json.loads(line) for line in saved.read_text().splitlines()]
    assert [(r["pair"], r["answer"]) for r in lines] == list(enumerate(clicked))
    assert {r["trials"] for r in lines} == {trials["id"]}

    other = tmp_path / "other.jsonl"
    other.write_text(saved.read_text().replace(trials["id"], "0123456789ab"))
    refused = run_vitscope(*args, "--answers", str(other))
    assert refused.returncode == 1 and "line 1 answers trial set '0123456789ab'" in refused.stderr
    assert not (tmp_path / "answers.jsonl").exists()

    command = shlex.split(trials["command"])  # the page's command rebuilds the same trials
    assert command[:2] == ["vitscope", "sorteval"] and "--pairs" in command
    scored = run_vitscope(*command[1:-1], str(saved))
    assert scored.returncode == 0, scored.stderr
    records = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in records] == clicked
    truth = [r["truth"] for r in records]
    result = json.loads((tmp_path / "score.json").read_text())
    assert result["judge"] == "human" and result["usable"] == 4
    assert result["correct"] == sum(a == t for a, t in zip(clicked, truth, strict=True))
