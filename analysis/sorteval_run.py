"""`vitscope sorteval`: sample the trials, show them to a judge, append every answer, score.

Trials are a pure function of the settings, so a re-run recomputes the same trials, skips the
pairs already in answers.jsonl and costs nothing more for them; answers from other settings are
refused. Images are read back from the shards a batch of trials at a time.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vitscope.analysis.files import AnalysisError, load_analysis
from vitscope.analysis.images import read_images, row_sources
from vitscope.analysis.sorteval import (
    GRID,
    Answer,
    SortScore,
    SortTrial,
    answered,
    compose_grid,
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
from vitscope.support.errors import BadSetting
from vitscope.support.progress import status
from vitscope.support.records import check_output_path, write_json_atomically

IMAGE_BATCH = 32
"""Trials whose images are read from the shards together."""
ANSWERS_FILE = "answers.jsonl"
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
    check_output_path(config.out_dir, "--out")
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
    job = prepare(config)
    todo = [t for t in job.trials if t.pair not in job.done]
    if config.judge == "human":
        if not config.answers:
            raise BadSetting("--judge human scores the file the game saved: pass --answers FILE")
        answers = _saved_answers(Path(config.answers), job.trials)
        record_answers(
            job.out / ANSWERS_FILE,
            job.trials,
            ((t.pair, answers[t.pair]) for t in todo if t.pair in answers),
        )
        judge_name = "human"
    else:
        judge = make_judge(config, *job.model, resolve_device(config.device))
        judge_name = judge.name
        status(f"{len(todo)} of {len(job.trials)} pairs to judge with the {judge.name} judge")
        record_answers(job.out / ANSWERS_FILE, job.trials, _ask(judge, todo, job.cache, job.shards))
    result = score(list(answered(job.out / ANSWERS_FILE).values()))
    write_json_atomically(
        job.out / "score.json",
        {
            **asdict(result),
            "judge": judge_name,
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


def _saved_answers(path: Path, trials: list[SortTrial]) -> dict[int, Answer]:
    """{pair: A or B} from the game's file; a line that is not one, or answers another eval's
    trials (its id differs), is a one-line error."""
    valid, expected_id = {t.pair for t in trials}, trial_set_id(trials)
    answers: dict[int, Answer] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            trial_set, pair, letter = record["trials"], int(record["pair"]), record["answer"]
        except (ValueError, KeyError, TypeError):
            raise AnalysisError(
                path,
                'lines {"trials": ID, "pair": N, "answer": "A" or "B"}',
                f"line {number}: {line[:60]!r}",
                "save the answers from the game page",
            ) from None
        if trial_set != expected_id:
            raise AnalysisError(
                path,
                f"answers to trial set {expected_id}",
                f"line {number} answers trial set {trial_set!r}",
                "score it with the command the game page shows (same seed, pairs and settings)",
            )
        if pair not in valid or letter not in ("A", "B"):
            raise AnalysisError(
                path,
                f"pairs 0..{len(trials) - 1} answered A or B",
                f"line {number}: {line[:60]!r}",
                "save the answers of this eval's game",
            )
        answers[pair] = letter
    return answers


def make_judge(config: SortEvalConfig, model: str | None, pretrained: str | None, device: str):
    if config.judge == "http":
        return GridPictures(http_judge(config))
    from vitscope.analysis.judge_clip import ClipJudge
    from vitscope.pipeline.model import load_vision_tower

    if model is None or pretrained is None:
        raise BadSetting(
            f"{config.run}: the SAE does not record its model; the clip judge needs it"
        )
    return ClipJudge(load_vision_tower(model, pretrained, device))


def http_judge(config: SortEvalConfig):
    """The HTTP judge from flags, else the environment, else OpenAI's endpoint."""
    from vitscope.analysis.judge_http import DEFAULT_MODEL, DEFAULT_URL, HttpJudge

    url = config.judge_url or os.environ.get("VITSCOPE_JUDGE_URL") or DEFAULT_URL
    model = config.judge_model or os.environ.get("VITSCOPE_JUDGE_MODEL") or DEFAULT_MODEL
    key = None
    if config.judge_key_env:
        key = os.environ.get(config.judge_key_env)
        if not key:
            raise BadSetting(
                f"--judge-key-env {config.judge_key_env}: that environment variable is not set; "
                "export the API key in it"
            )
    return HttpJudge(url, model, key, timeout=config.judge_timeout, retries=config.judge_retries)


class GridPictures:
    """For judges that see one picture per grid: composes the 3x3 grids first."""

    def __init__(self, judge) -> None:
        self.judge, self.name = judge, judge.name

    def answer(self, grid_a: list, grid_b: list, query) -> Answer | None:
        return self.judge.answer(compose_grid(grid_a), compose_grid(grid_b), query)


def _ask(
    judge, trials: list[SortTrial], cache, shards: Path | None
) -> Iterator[tuple[int, Answer | None]]:
    sources = row_sources(cache, {r for t in trials for r in (*t.rows_a, *t.rows_b, t.query)})
    with tqdm(total=len(trials), unit="pair", desc=f"sorteval ({judge.name})") as progress:
        for start in range(0, len(trials), IMAGE_BATCH):
            batch = trials[start : start + IMAGE_BATCH]
            needed = {r for t in batch for r in (*t.rows_a, *t.rows_b, t.query)}
            images = read_images(cache, needed, shards, sources)
            for trial in batch:
                grid_a = [images[r] for r in trial.rows_a]
                grid_b = [images[r] for r in trial.rows_b]
                yield trial.pair, judge.answer(grid_a, grid_b, images[trial.query])
                progress.update(1)


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
