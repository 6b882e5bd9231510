"""The sort eval: its sampling rules hold and are seeded, the score's interval is right, and the
clip and http judges run end to end, the http one through faults and a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from openai_server import serve_openai

from conftest import run_vitscope
from vitscope.analysis.sorteval import GRID, sample_trials, wilson_interval

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
        proc.wait(timeout=30)
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
    saved = chromium.download_dir / "answers.jsonl"
    saved.unlink(missing_ok=True)
    chromium.find_element(By.ID, "save").click()
    deadline = time.monotonic() + 20
    while not saved.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [json.loads(line) for line in saved.read_text().splitlines()]
    assert [(r["pair"], r["answer"]) for r in lines] == list(enumerate(clicked))

    scored = run_vitscope(*args, "--answers", str(saved))
    assert scored.returncode == 0, scored.stderr
    records = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in records] == clicked
    truth = [r["truth"] for r in records]
    result = json.loads((tmp_path / "score.json").read_text())
    assert result["judge"] == "human" and result["usable"] == 4
    assert result["correct"] == sum(a == t for a, t in zip(clicked, truth, strict=True))
