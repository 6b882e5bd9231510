"""The sort eval (Anthropic's autointerpretability eval, as CLIP-Scope ran it): is a feature's
set of top images coherent enough that a judge can tell which of two features a new image
belongs to?

Sampling (a pure function of the seed): pairs of distinct live features; per pair the true
feature (A or B at random); a query image where the true feature fires, that is in neither
feature's top images and where the other feature does not fire. A judge sees both grids and the
query and answers A or B; accuracy over usable answers, with a 95% Wilson interval (chance 0.5).

Top images and "fires" come from one pass over the cache for the candidate features: by the
feature's peak over all tokens (`token="all"`) or its CLS value (`token="cls"`, wherever the
cache's token layout puts CLS; refused for models without one). Answers are
appended to answers.jsonl as they arrive, so an interrupted eval resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from vitscope.cache_spec.store import Cache
from vitscope.saes.sae import SAE
from vitscope.support.errors import BadSetting
from vitscope.support.progress import status
from vitscope.train.loader import read_chunks

Answer = Literal["A", "B"]
TokenMode = Literal["all", "cls"]
GRID = 9
"""Top images per feature shown to the judge (a 3x3 grid)."""


@dataclass(frozen=True)
class SortTrial:
    """One question: which feature's grid does `query` belong to?"""

    pair: int
    feature_a: int
    feature_b: int
    rows_a: tuple[int, ...]
    rows_b: tuple[int, ...]
    query: int
    truth: Answer


def feature_peaks(
    sae: SAE,
    cache: Cache,
    layer: int,
    features: np.ndarray,
    token: TokenMode,
    max_images: int = 0,
    threads: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Per image, each candidate feature's peak value (0 where it does not fire): (N, S) float32,
    and the images' rows (N,). Only the S candidates are kept, never (N, F). CLS is where the
    cache's token layout puts it; a model without one is a one-line error before any reading."""
    tokens = cache.attrs.token_layout.token_set(token)
    chunks = cache.chunks()
    if max_images:
        chunks = chunks[: max(1, -(-max_images // cache.attrs.chunk_images))]
    columns = torch.from_numpy(features)
    peaks, rows = [], []
    for ref, acts_CTD in read_chunks(cache, layer, chunks, threads):
        with torch.no_grad():
            codes = sae.encode(acts_CTD[:, tokens])
        n = codes.indices.shape[0]
        values = codes.values.float().clamp_min(0).reshape(n, -1)
        peak_CF = torch.zeros(n, sae.n_latents).scatter_reduce(
            1, codes.indices.reshape(n, -1).cpu(), values.cpu(), "amax"
        )
        peaks.append(peak_CF[:, columns].numpy())
        rows.append(np.arange(ref.first_row, ref.first_row + ref.n_rows))
    return np.concatenate(peaks)[: max_images or None], np.concatenate(rows)[: max_images or None]


def sample_trials(
    peaks_NS: np.ndarray, rows_N: np.ndarray, features: np.ndarray, pairs: int, seed: int
) -> list[SortTrial]:
    """`pairs` trials obeying the sampling rules; features without enough images are skipped."""
    rng = np.random.default_rng(seed)
    fires = peaks_NS > 0
    top = np.argsort(-peaks_NS, axis=0, kind="stable")[:GRID]  # (GRID, S) image indices
    usable = np.flatnonzero(fires.sum(axis=0) > GRID)
    if len(usable) < 2:
        raise BadSetting(
            f"only {len(usable)} feature(s) fire on more than {GRID} images; the sort eval needs "
            "two; analyse more images or train longer"
        )
    trials: list[SortTrial] = []
    for _ in range(pairs * 20):
        if len(trials) == pairs:
            break
        a, b = rng.choice(usable, size=2, replace=False)
        true, other = (a, b) if rng.random() < 0.5 else (b, a)
        candidates = fires[:, true] & ~fires[:, other]
        candidates[top[:, a]] = candidates[top[:, b]] = False
        choices = np.flatnonzero(candidates)
        if not len(choices):
            continue
        query = int(rng.choice(choices))
        trials.append(
            SortTrial(
                pair=len(trials),
                feature_a=int(features[a]),
                feature_b=int(features[b]),
                rows_a=tuple(int(r) for r in rows_N[top[:, a]]),
                rows_b=tuple(int(r) for r in rows_N[top[:, b]]),
                query=int(rows_N[query]),
                truth="A" if true == a else "B",
            )
        )
    if len(trials) < pairs:
        shortfall = (
            f"only {len(trials)} of {pairs} pairs found a query image that fires for one feature "
            "only and is in neither top set; raise --max-images or --candidates"
        )
        if not trials:
            raise BadSetting(shortfall)
        status(f"warning: {shortfall}; scoring the {len(trials)}")
    return trials


def answered(path: Path) -> dict[int, dict]:
    """Answers already in the file, by pair (a torn last line from a kill is ignored)."""
    found = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            found[record["pair"]] = record
    return found


def record_answers(
    path: Path, trials: list[SortTrial], answers: Iterator[tuple[int, Answer | None]]
) -> None:
    """Append each answer with its trial as it arrives (flushed: a kill loses at most one)."""
    by_pair = {t.pair: t for t in trials}
    drop_torn_line(path)
    with open(path, "a") as f:
        for pair, answer in answers:
            f.write(json.dumps({**asdict(by_pair[pair]), "answer": answer}) + "\n")
            f.flush()


def drop_torn_line(path: Path) -> None:
    """Cut a last line a kill left without its newline, so the next append starts a line of its
    own instead of gluing onto the torn one (and being lost with it)."""
    if not path.is_file():
        return
    with open(path, "r+b") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def trial_set_id(trials: list[SortTrial]) -> str:
    """A short hash of the trials themselves: answers saved by the game carry it, so answers to
    another eval's trials (another seed, SAE, cache or setting) are refused when scored."""
    blob = json.dumps([asdict(t) for t in trials], sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


@dataclass(frozen=True)
class SortScore:
    trials: int
    usable: int
    correct: int
    accuracy: float | None
    """None when no answer was usable (JSON has no NaN)."""
    low: float
    high: float
    """95% Wilson interval of the accuracy."""

    def summary(self) -> str:
        """The score in one line, as the commands print it."""
        if self.accuracy is None:
            return f"no usable answer among {self.trials} pairs"
        return (
            f"accuracy {self.accuracy:.3f} [{self.low:.3f}, {self.high:.3f}] over {self.usable} "
            f"usable of {self.trials} pairs (chance 0.5)"
        )


def score(records: list[dict]) -> SortScore:
    usable = [r for r in records if r["answer"] in ("A", "B")]
    correct = sum(r["answer"] == r["truth"] for r in usable)
    low, high = wilson_interval(correct, len(usable))
    accuracy = correct / len(usable) if usable else None
    return SortScore(len(records), len(usable), correct, accuracy, low, high)


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (good at small n and near 0 or 1)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def compose_grid(images: list, side: int = 3, cell: int = 160):
    """Up to side x side images as one square picture (for judges that see one image per grid)."""
    from PIL import Image

    canvas = Image.new("RGB", (side * cell, side * cell), "white")
    for i, image in enumerate(images[: side * side]):
        thumb = image.convert("RGB").resize((cell - 4, cell - 4))
        canvas.paste(thumb, ((i % side) * cell + 2, (i // side) * cell + 2))
    return canvas
