"""One error type for everything wrong with a cache on disk: it always names the path."""

from __future__ import annotations

from vitscope.support.records import FileFormatError


class CacheSpecError(FileFormatError):
    """A cache (or one of its files) does not match the spec: says where, what and how to fix."""
