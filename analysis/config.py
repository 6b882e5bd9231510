"""Settings of `vitscope analyze`: one frozen dataclass, as every job has."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from vitscope.support.configs import AtLeast, check_bounds


@dataclass(frozen=True)
class AnalyzeConfig:
    """One streaming pass of an SAE over its cache: statistics and top images per feature."""

    run: str
    """The SAE: a run folder, an SAE folder, a CLIP-Scope .pt or a hub id."""
    cache: str = ""
    """The cache to encode; empty = the cache the SAE was trained on (its cfg.json says)."""
    out: str = ""
    """Analysis folder; empty = RUN/analysis (or ./analysis for a non-folder SAE)."""
    shards: str = ""
    """Folder of the cache's shards, if they moved since caching; empty = where the cache says."""
    grids: Annotated[int, AtLeast(0)] = 4
    """Features whose top-image grid is drawn at the end (those firing on the most images)."""
    layer: Annotated[int, AtLeast(-1)] = -1
    """Cached layer to read; -1 = the SAE's own layer."""
    top_n: Annotated[int, AtLeast(1)] = 9
    """Top images kept per feature (CLIP-Scope showed 9)."""
    max_images: Annotated[int, AtLeast(0)] = 0
    """Stop after this many images; 0 = every committed row."""
    read_threads: Annotated[int, AtLeast(1)] = 4
    """Threads reading and decompressing chunks ahead of the encoder."""
    checkpoint_every: Annotated[int, AtLeast(1)] = 256
    """Chunks between saved states that --resume continues from."""
    device: str = "auto"
    """Torch device for the encoder: auto = cuda when present, else cpu."""
    resume: bool = False
    """Continue an interrupted pass from its last saved state."""

    def __post_init__(self) -> None:
        check_bounds(self)

    @property
    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        run = Path(self.run)
        return run / "analysis" if run.is_dir() else Path("analysis")
