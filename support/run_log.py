"""A training run's log.jsonl: one record per logged window, its keys spelled here alone.

The trainer appends records; the report, the analysis pictures, `vitscope compare` and the hub's
model card read them. Reading needs only the standard library (no plotting stack), and a log of
any earlier version reads: fields added since the first run format are optional (None).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from vitscope.support.records import FileFormatError, parse_json, parse_record

LOG_FILE = "log.jsonl"


class RunLogError(FileFormatError):
    """A line of log.jsonl that is not a log record."""


@dataclass(frozen=True)
class HeldOut:
    """Measured on the held-out images at the end of the window (the SAE in eval mode)."""

    mse: float
    fvu: float
    """Σ‖x − x̂‖² / Σ‖x − x̄‖² (x̄ the held-out mean vector), in float64 over all held-out tokens."""
    explained_variance: float
    """1 − fvu: the figure that compares with Gao et al., saev and SAELens."""
    l0: float
    mse_by_token: tuple[float, ...]
    """Held-out MSE at every token position (0 = CLS), over every image (tokens left out by
    --exclude-outlier-tokens included, so the positions they sit at show)."""
    clipscope_ev: float | None = None
    """sache's mean over tokens of per-token explained variance in standardised units, the
    figure CLIP-Scope's model card reports (train/explained_variance.py); None in older logs."""
    mse_ordinary: float | None = None
    """Held-out MSE on the tokens at or below the outlier threshold (train/outliers.py: the
    exclusion threshold, else 10x the median token norm); null in logs before issue 25."""
    mse_outlier: float | None = None
    """Held-out MSE on the tokens above it; null when none of them is (or in older logs)."""
    outlier_fraction: float | None = None
    """Share of the held-out tokens above the threshold; null in older logs."""


@dataclass(frozen=True)
class LogRecord:
    """One logged window of training: means over its steps, its speed, held-out quality."""

    tokens: int
    """Tokens trained so far (the x axis of every curve)."""
    step: int
    lr: float
    mse: float
    aux_loss: float
    l0: float
    dead_fraction: float
    tokens_per_s: float
    loader_wait_fraction: float
    distinct_images_per_batch: float
    distinct_images_per_batch_min: int
    heldout: HeldOut


def append_record(run_dir: Path, record: LogRecord) -> None:
    """One line at the end of RUN/log.jsonl (the folder is made if needed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOG_FILE, "a") as f:
        f.write(json.dumps(_present(dataclasses.asdict(record))) + "\n")


def _present(data: dict) -> dict:
    """The fields a record has: an optional one it lacks (None, a field later versions added)
    is left out, so an older log's records write back as they were."""
    return {
        key: _present(value) if isinstance(value, dict) else value
        for key, value in data.items()
        if value is not None
    }


def read_log(run_dir: Path | str) -> list[LogRecord]:
    """Every record of RUN/log.jsonl in order; [] for a folder without one (an SAE that was not
    trained here). A last line a kill cut short is left out."""
    return [record for _, record in _lines(Path(run_dir) / LOG_FILE)]


def drop_records_after(run_dir: Path, tokens: int) -> None:
    """Keep the lines up to `tokens` trained, as written: a resumed run writes the rest anew."""
    path = run_dir / LOG_FILE
    kept = [line for line, record in _lines(path) if record.tokens <= tokens]
    if path.is_file():
        path.write_text("".join(line + "\n" for line in kept))


def _lines(path: Path) -> list[tuple[str, LogRecord]]:
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n") and not _is_json(lines[-1]):
        lines.pop()  # torn by a kill mid-write
    parsed = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            where = f"{path}, line {number}"
            parsed.append((line, parse_log_record(parse_json(line, where, RunLogError), where)))
    return parsed


def parse_log_record(data: object, where: str) -> LogRecord:
    """A record from its JSON object; keys a later version adds are ignored."""
    if isinstance(data, dict) and isinstance(data.get("heldout"), dict):
        heldout = parse_record(HeldOut, data["heldout"], where, "held-out metrics", RunLogError)
        data = {**data, "heldout": heldout}
    return parse_record(LogRecord, data, where, "log record", RunLogError)


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True
