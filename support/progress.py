"""One-line status for the steps of a job that have no progress bar (loading a model, reading the
held-out set, initialising SAEs), so no command sits silent for more than a few seconds."""

from __future__ import annotations

import sys


def status(message: str) -> None:
    """Print a step to stderr as it starts (stdout stays for results)."""
    print(f"... {message}", file=sys.stderr, flush=True)
