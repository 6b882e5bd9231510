"""`vitscope sorteval`: sample the trials, show them to a judge, append every answer, score.

Trials are a pure function of the settings, so a re-run recomputes the same trials, skips the
pairs already in answers.jsonl and costs nothing more for them; answers from other settings are
refused. Images are read back from the shards a batch of trials at a time.
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from vitscope.analysis.files import AnalysisError, load_analysis
from vitscope.analysis.judges import judge_for
from vitscope.analysis.sorteval import (
    GRID,
    SortScore,
    SortTrial,
    answered,
    feature_peaks,
    record_answers,
    sample_trials,
    score,
    trial_set_id,
)
from vitscope.analysis.sorteval_config import SortEvalConfig
from vitscope.cache_spec.store import Cache, open_cache
from vitscope.saes.load import load_sae
from vitscope.support.devices import resolve_device
from vitscope.support.outputs import check_output_path, holding
from vitscope.support.progress import status
from vitscope.support.records import write_json_atomically

ANSWERS_FILE = "answers.jsonl"
SORT_EVAL_FOLDER = holding("a sort eval's folder", ANSWERS_FILE, "score.json", "game")
GAME_THUMB_PX = 224


@dataclass
class Prepared:
    """What every judge needs: the trials, where their images are, where answers go."""

    trials: list[SortTrial]
    cache: Cache
    shards: Path | None
    model: tuple[str | None, str | None]
    out: Path
    done: dict[int, dict]


def prepare(config: SortEvalConfig) -> Prepared:
    """The trials (a pure function of the settings) and the answers already on file for them."""
    check_output_path(config.out_dir, "--out", overwrite=config.overwrite, own=SORT_EVAL_FOLDER)
    device = resolve_device(config.device)
    folder = Path(config.analysis) if config.analysis else Path(config.run) / "analysis"
    analysis = load_analysis(folder)
    sae = load_sae(config.run, device=device)
    cache = open_cache(config.cache or analysis.meta.cache)
    live = np.flatnonzero(analysis.features["fire_images"].to_numpy() > GRID)
    rng = np.random.default_rng([config.seed, 1])
    candidates = np.sort(rng.choice(live, size=min(config.candidates, len(live)), replace=False))
    status(f"ranking images of {len(candidates)} candidate features ({config.token} tokens)")
    peaks, rows = feature_peaks(
        sae, cache, analysis.meta.layer, candidates, config.token, config.max_images
    )
    trials = sample_trials(peaks, rows, candidates, config.pairs, config.seed)
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    done = _check_answers(out / ANSWERS_FILE, trials)
    shards = Path(config.shards) if config.shards else None
    return Prepared(trials, cache, shards, (sae.card.model, sae.card.pretrained), out, done)


def sort_eval(config: SortEvalConfig) -> SortScore:
    """Judge the pairs not yet answered (or, for a human, take the game's saved answers), append
    them to answers.jsonl, and score every answer on file into score.json."""
    build_judge = judge_for(config)  # bad judge settings are refused before any work
    job = prepare(config)
    todo = [t for t in job.trials if t.pair not in job.done]
    judge = build_judge(job)
    status(f"{len(todo)} of {len(job.trials)} pairs to judge with the {judge.name} judge")
    record_answers(job.out / ANSWERS_FILE, job.trials, judge.answers(todo))
    result = score(list(answered(job.out / ANSWERS_FILE).values()))
    write_json_atomically(
        job.out / "score.json",
        {
            **asdict(result),
            "judge": judge.name,
            "token": config.token,
            "seed": config.seed,
            "unusable": result.trials - result.usable,
        },
    )
    return result


def write_game(config: SortEvalConfig) -> Path:
    """The sort eval as a page for a person (browser_assets/sortgame.*); returns the page."""
    from vitscope.analysis.browser import ASSETS, RUN_SITE, link_games, write_thumbnails

    job = prepare(config)
    game = job.out / "game"
    (game / "data").mkdir(parents=True, exist_ok=True)
    for name in ("sortgame.html", "sortgame.js", "style.css"):
        shutil.copy(ASSETS / name, game / name)
    rows = sorted({r for t in job.trials for r in (*t.rows_a, *t.rows_b, t.query)})
    write_thumbnails(job.cache, np.asarray(rows), game / "images", job.shards, GAME_THUMB_PX)
    shown = [{k: v for k, v in asdict(t).items() if k != "truth"} for t in job.trials]
    trials = {"id": trial_set_id(job.trials), "pairs": shown, "command": scoring_command(config)}
    (game / "data" / "trials.js").write_text(f"VS.trials = {json.dumps(trials)};\n")
    link_games(Path(config.run), Path(config.run) / RUN_SITE)
    return game / "sortgame.html"


def scoring_command(config: SortEvalConfig) -> str:
    """The command that scores the game's answers: every setting that shapes the trials or
    says where they are, as given, so that it rebuilds the very trials the page showed."""
    flags = [
        f"--{field.name.replace('_', '-')} {shlex.quote(str(getattr(config, field.name)))}"
        for field in fields(config)
        if field.name not in ("run", "judge", "answers", "device")
        and not field.name.startswith("judge_")
        and getattr(config, field.name) != field.default
    ]
    run = shlex.quote(config.run)
    return " ".join(["vitscope sorteval", run, "--judge human", *flags, "--answers answers.jsonl"])


def _check_answers(path: Path, trials: list[SortTrial]) -> dict[int, dict]:
    """Answers on file must be of these very trials (same seed, SAE, cache and settings)."""
    done = answered(path)
    by_pair = {t.pair: asdict(t) for t in trials}
    for pair, record in done.items():
        trial = {k: v for k, v in record.items() if k != "answer"}
        expected = by_pair.get(pair)
        if expected is None or json.loads(json.dumps(expected)) != trial:
            raise AnalysisError(
                path,
                f"answers to this eval's pair {pair}",
                "an answer to another trial",
                "use a new --out for other settings",
            )
    return done
