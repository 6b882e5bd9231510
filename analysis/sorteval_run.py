"""`vitscope sorteval`: sample the trials, show them to a judge, append every answer, score.

Trials are a pure function of the settings, so a re-run recomputes the same trials, skips the
pairs already in answers.jsonl and costs nothing more for them; answers from other settings are
refused. Images are read back from the shards a batch of trials at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vitscope.analysis.files import AnalysisError, load_analysis
from vitscope.analysis.images import read_images
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
)
from vitscope.analysis.sorteval_config import SortEvalConfig
from vitscope.cache_spec.store import open_cache
from vitscope.saes.load import load_sae
from vitscope.support.devices import resolve_device
from vitscope.support.progress import status
from vitscope.support.records import write_json_atomically

IMAGE_BATCH = 32
"""Trials whose images are read from the shards together."""


def sort_eval(config: SortEvalConfig) -> SortScore:
    """Run (or resume) the eval; writes answers.jsonl and score.json into config.out_dir."""
    device = resolve_device(config.device)
    analysis = load_analysis(
        Path(config.analysis) if config.analysis else Path(config.run) / "analysis"
    )
    sae = load_sae(config.run, device=device)
    cache = open_cache(config.cache or analysis.meta.cache)
    shards = Path(config.shards) if config.shards else None
    fire_images = analysis.features["fire_images"].to_numpy()
    live = np.flatnonzero(fire_images > GRID)
    rng = np.random.default_rng([config.seed, 1])
    candidates = np.sort(rng.choice(live, size=min(config.candidates, len(live)), replace=False))
    status(f"ranking images of {len(candidates)} candidate features ({config.token} tokens)")
    peaks, rows = feature_peaks(
        sae, cache, analysis.meta.layer, candidates, config.token, config.max_images
    )
    trials = sample_trials(peaks, rows, candidates, config.pairs, config.seed)
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    answers_path = out / "answers.jsonl"
    done = _check_answers(answers_path, trials)
    judge = make_judge(config, sae.card.model, sae.card.pretrained, device)
    todo = [t for t in trials if t.pair not in done]
    status(f"{len(todo)} of {len(trials)} pairs to judge with the {judge.name} judge")
    record_answers(answers_path, trials, _ask(judge, todo, cache, shards))
    result = score(list(answered(answers_path).values()))
    write_json_atomically(
        out / "score.json",
        {
            **asdict(result),
            "judge": judge.name,
            "token": config.token,
            "seed": config.seed,
            "unusable": result.trials - result.usable,
        },
    )
    return result


def make_judge(config: SortEvalConfig, model: str | None, pretrained: str | None, device: str):
    if config.judge == "http":
        from vitscope.analysis.judge_http import HttpJudge

        return GridPictures(HttpJudge(config.judge_url, config.judge_model))
    from vitscope.analysis.judge_clip import ClipJudge
    from vitscope.pipeline.model import load_vision_tower

    if model is None or pretrained is None:
        raise ValueError(
            f"{config.run}: the SAE does not record its model; the clip judge needs it"
        )
    return ClipJudge(load_vision_tower(model, pretrained, device))


class GridPictures:
    """For judges that see one picture per grid: composes the 3x3 grids first."""

    def __init__(self, judge) -> None:
        self.judge, self.name = judge, judge.name

    def answer(self, grid_a: list, grid_b: list, query) -> Answer | None:
        return self.judge.answer(compose_grid(grid_a), compose_grid(grid_b), query)


def _ask(
    judge, trials: list[SortTrial], cache, shards: Path | None
) -> Iterator[tuple[int, Answer | None]]:
    with tqdm(total=len(trials), unit="pair", desc=f"sorteval ({judge.name})") as progress:
        for start in range(0, len(trials), IMAGE_BATCH):
            batch = trials[start : start + IMAGE_BATCH]
            needed = {r for t in batch for r in (*t.rows_a, *t.rows_b, t.query)}
            images = read_images(cache, needed, shards)
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
