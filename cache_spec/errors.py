"""One error type for everything wrong with a cache on disk: it always names the path."""

from __future__ import annotations

from pathlib import Path


class CacheSpecError(Exception):
    """A cache (or one of its files) does not match the spec: says where, what and how to fix."""

    def __init__(self, path: Path | str, expected: str, found: str, fix: str = "") -> None:
        self.path = Path(path)
        message = f"{path}: expected {expected}, found {found}"
        super().__init__(f"{message}; {fix}" if fix else message)
