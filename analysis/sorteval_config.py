"""Settings of `vitscope sorteval`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from vitscope.support.configs import Above, AtLeast, check_bounds
from vitscope.support.shared_options import Device, Overwrite, Shards


@dataclass(frozen=True)
class SortEvalConfig(Shards, Device, Overwrite):
    """A sort eval of one analysed SAE: pairs of features, a query image each, one judge."""

    run: str
    """The SAE's run folder (analysed with `vitscope analyze`)."""
    judge: Literal["clip", "http", "human"] = "clip"
    """clip: the CLIP model itself (offline); http: an OpenAI-compatible vision chat endpoint;
    human: a game page for a person (then --answers scores what it saved)."""
    pairs: Annotated[int, AtLeast(1)] = 500
    """Feature pairs judged."""
    token: Literal["all", "cls"] = "all"
    """Which activation ranks images and decides "fires": the peak over all tokens, or CLS."""
    seed: Annotated[int, AtLeast(0)] = 0
    """Seed of the pairs, the true feature of each and the query images."""
    candidates: Annotated[int, AtLeast(2)] = 1024
    """Live features (by the analysis) drawn as candidates for the pairs."""
    max_images: Annotated[int, AtLeast(0)] = 20_000
    """Images scanned for top images and queries; 0 = every committed row."""
    analysis: str = ""
    """Analysis folder; empty = RUN/analysis."""
    cache: str = ""
    """Cache; empty = the one the analysis read."""
    out: str = ""
    """Folder for answers.jsonl and score.json; empty = RUN/sorteval-JUDGE-TOKEN."""
    judge_url: str = ""
    """http judge: the endpoint's base URL; empty = $VITSCOPE_JUDGE_URL, else OpenAI's."""
    judge_model: str = ""
    """http judge: the vision model to ask; empty = $VITSCOPE_JUDGE_MODEL, else gpt-4o-mini."""
    judge_key_env: str = ""
    """http judge: the environment variable holding the API key (never the key itself, which a
    flag would leave in the shell's history and `ps`); empty = VITSCOPE_JUDGE_API_KEY, else
    OPENAI_API_KEY."""
    judge_timeout: Annotated[float, Above(0)] = 60.0
    """http judge: seconds to wait for one reply."""
    judge_retries: Annotated[int, AtLeast(0)] = 5
    """http judge: retries of a request after a 429, a 5xx, a timeout or a dropped connection,
    with exponential backoff (or the server's Retry-After)."""
    answers: str = ""
    """human judge: the answers.jsonl the game page saved, to score."""

    def __post_init__(self) -> None:
        check_bounds(self)

    @property
    def out_dir(self) -> Path:
        return (
            Path(self.out) if self.out else Path(self.run) / f"sorteval-{self.judge}-{self.token}"
        )
