"""Live curves: each log line of a run also goes to TensorBoard event files in RUN/tensorboard.

Optional (`vitscope[tensorboard]`); log.jsonl stays the record, this is a view of it. The core
install never imports torch.utils.tensorboard: it is imported when a writer is opened.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from vitscope.support.extras import require
from vitscope.support.run_log import LogRecord

SCALARS: dict[str, Callable[[LogRecord], float]] = {
    "train/mse": lambda r: r.mse,
    "train/aux_loss": lambda r: r.aux_loss,
    "train/l0": lambda r: r.l0,
    "train/dead_fraction": lambda r: r.dead_fraction,
    "train/lr": lambda r: r.lr,
    "speed/tokens_per_s": lambda r: r.tokens_per_s,
    "speed/loader_wait_fraction": lambda r: r.loader_wait_fraction,
    "heldout/fvu": lambda r: r.heldout.fvu,
    "heldout/explained_variance": lambda r: r.heldout.explained_variance,
    "heldout/clipscope_ev": lambda r: r.heldout.clipscope_ev,
    "heldout/mse": lambda r: r.heldout.mse,
    "heldout/l0": lambda r: r.heldout.l0,
}
"""TensorBoard tag -> its value in a log record."""


class TensorBoardLog:
    """Writes log records as scalars at global step = tokens trained, so runs with different
    batch sizes line up, as in report.png."""

    def __init__(self, log_dir: Path, resumed_at: int = 0) -> None:
        """`resumed_at`: the checkpoint's tokens; TensorBoard hides the killed run's later points,
        which log.jsonl drops too, so each step shows the resumed run's values."""
        require("tensorboard", "tensorboard", "--tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(
            str(log_dir), purge_step=resumed_at + 1 if resumed_at else None
        )

    def write(self, record: LogRecord) -> None:
        """One log record; flushed, so the curves are live and a killed run keeps its points."""
        step = record.tokens
        for tag, value_of in SCALARS.items():
            self._writer.add_scalar(tag, value_of(record), step)
        # The spread of held-out MSE over token positions (CLS apart from patches, say).
        by_token = np.asarray(record.heldout.mse_by_token)
        self._writer.add_histogram("heldout/mse_by_token", by_token, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
