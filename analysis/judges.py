"""The sort eval's judges behind one interface and one registry, so every judge is asked the same
way and an unknown name is refused instead of quietly becoming another judge."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from PIL import Image
from tqdm import tqdm

from vitscope.analysis.files import AnalysisError
from vitscope.analysis.images import read_images, row_sources
from vitscope.analysis.sorteval import Answer, SortTrial, compose_grid, trial_set_id
from vitscope.analysis.sorteval_config import SortEvalConfig
from vitscope.support.devices import resolve_device
from vitscope.support.errors import BadSetting, MissingInput

if TYPE_CHECKING:
    from vitscope.analysis.sorteval_run import Prepared

IMAGE_BATCH = 32
"""Trials whose images are read from the shards together."""

AnswerImages = Callable[[list[Image.Image], list[Image.Image], Image.Image], Answer | None]
"""A judge that looks: grid A's images, grid B's, the query -> its letter (None: unusable)."""


class Judge(Protocol):
    """Answers trials: for each one it answers, its pair and A, B or None (an unusable reply)."""

    name: str

    def answers(self, trials: list[SortTrial]) -> Iterator[tuple[int, Answer | None]]: ...


class LookingJudge:
    """A judge that sees each trial's images, read from the shards a batch of trials at a time."""

    def __init__(self, name: str, answer: AnswerImages, job: Prepared) -> None:
        self.name, self._answer, self._job = name, answer, job

    def answers(self, trials: list[SortTrial]) -> Iterator[tuple[int, Answer | None]]:
        cache, shards = self._job.cache, self._job.shards
        sources = row_sources(cache, {r for t in trials for r in (*t.rows_a, *t.rows_b, t.query)})
        with tqdm(total=len(trials), unit="pair", desc=f"sorteval ({self.name})") as progress:
            for start in range(0, len(trials), IMAGE_BATCH):
                batch = trials[start : start + IMAGE_BATCH]
                needed = {r for t in batch for r in (*t.rows_a, *t.rows_b, t.query)}
                images = read_images(cache, needed, shards, sources)
                for trial in batch:
                    grid_a = [images[r] for r in trial.rows_a]
                    grid_b = [images[r] for r in trial.rows_b]
                    yield trial.pair, self._answer(grid_a, grid_b, images[trial.query])
                    progress.update(1)


class SavedAnswers:
    """A person's answers, saved by the game page: the trials it answered, no images read."""

    name = "human"

    def __init__(self, saved: dict[int, Answer]) -> None:
        self.saved = saved

    def answers(self, trials: list[SortTrial]) -> Iterator[tuple[int, Answer | None]]:
        return ((t.pair, self.saved[t.pair]) for t in trials if t.pair in self.saved)


JudgeBuilder = Callable[["Prepared"], Judge]
"""Builds a judge once the trials are known; made from the settings, which it checked first."""


def clip_judge(config: SortEvalConfig) -> JudgeBuilder:
    """The CLIP model the SAE's cache was made with (offline)."""

    def build(job: Prepared) -> Judge:
        from vitscope.analysis.judge_clip import ClipJudge
        from vitscope.pipeline.model import load_vision_tower

        model, pretrained = job.model
        if model is None or pretrained is None:
            raise BadSetting(
                f"{config.run}: the SAE does not record its model, which the clip judge uses; "
                "choose --judge http or --judge human"
            )
        tower = load_vision_tower(model, pretrained, resolve_device(config.device))
        return LookingJudge("clip", ClipJudge(tower).answer, job)

    return build


def http_judge(config: SortEvalConfig) -> JudgeBuilder:
    """A vision chat endpoint; it sees one picture per grid, so the grids are composed first."""
    from vitscope.analysis.judge_http import HttpJudge

    asked = HttpJudge.from_config(config)

    def answer(
        grid_a: list[Image.Image], grid_b: list[Image.Image], query: Image.Image
    ) -> Answer | None:
        return asked.answer(compose_grid(grid_a), compose_grid(grid_b), query)

    return lambda job: LookingJudge("http", answer, job)


def human_judge(config: SortEvalConfig) -> JudgeBuilder:
    """The answers the game page saved (`vitscope sorteval --judge human` writes the page)."""
    path = Path(config.answers)
    if not config.answers:
        raise BadSetting("--judge human scores the file the game saved: pass --answers FILE")
    if not path.is_file():
        raise MissingInput(
            f"--answers {path}: expected the answers.jsonl the game page saved, found no file; "
            "answer the game and save its answers there"
        )
    return lambda job: SavedAnswers(saved_answers(path, job.trials))


JUDGES: dict[str, Callable[[SortEvalConfig], JudgeBuilder]] = {
    "clip": clip_judge,
    "http": http_judge,
    "human": human_judge,
}


def judge_for(config: SortEvalConfig) -> JudgeBuilder:
    """The judge `config.judge` names, its settings checked before any work; an unknown name is
    one line listing the known ones."""
    if config.judge not in JUDGES:
        raise BadSetting(
            f"--judge {config.judge!r}: expected one of {', '.join(JUDGES)}; choose one"
        )
    return JUDGES[config.judge](config)


def saved_answers(path: Path, trials: list[SortTrial]) -> dict[int, Answer]:
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
