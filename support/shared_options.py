"""Settings that several commands share, declared once: each config that takes one inherits its
mixin, so the flag, the TOML key and the help text are the same everywhere.

The mixins are keyword-only, so a config's own required fields (RUN, ...) may come first.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Shards:
    shards: str = ""
    """Folder of the cache's shards, if they moved since caching; empty = where the cache says."""


@dataclass(frozen=True, kw_only=True)
class Device:
    device: str = "auto"
    """Torch device: auto = cuda when present, else cpu."""


@dataclass(frozen=True, kw_only=True)
class Overwrite:
    overwrite: bool = False
    """Write into an output that exists and was not written by this command (a folder of other
    files, a file of another kind), replacing what it holds. Without it such an output is
    refused; an empty folder, and the command's own earlier output, need no flag."""


@dataclass(frozen=True, kw_only=True)
class Resume:
    resume: bool = False
    """Continue an interrupted run from its newest saved state; without it, a folder that holds
    one is refused."""
