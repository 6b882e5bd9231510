"""Settings of `vitscope analyze` and `vitscope monosemanticity`: one frozen dataclass per job."""

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
    """Cached layer to read: the SAE's own (-1, or the same number); set only for an SAE that
    does not record its layer."""
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


@dataclass(frozen=True)
class MonosemanticityConfig:
    """The MonoSemanticity Score of every feature of an SAE over the images of a cache."""

    run: str
    """The SAE: a run folder, an SAE folder, a CLIP-Scope .pt or a hub id."""
    cache: str = ""
    """The evaluation images' cache; empty = the cache the SAE was trained on."""
    out: str = ""
    """Analysis folder to write into; empty = RUN/analysis (or ./analysis for a non-folder SAE)."""
    shards: str = ""
    """Folder of the cache's shards, if they moved since caching; empty = where the cache says."""
    encoder: str = ""
    """open_clip model whose image embeddings give the similarities; empty = the cache's model."""
    encoder_weights: str = ""
    """Its pretrained tag or weights file ('none' = random); empty = the cache's weights when
    --encoder is empty, else required."""
    layer: Annotated[int, AtLeast(-1)] = -1
    """Cached layer to read: the SAE's own (-1, or the same number); set only for an SAE that
    does not record its layer."""
    max_images: Annotated[int, AtLeast(0)] = 0
    """The first this many committed rows (whole chunks) are the evaluation set; 0 = all."""
    batch_size: Annotated[int, AtLeast(1)] = 64
    """Images per forward pass of the encoder."""
    num_workers: Annotated[int, AtLeast(0)] = 4
    """DataLoader workers decoding and preprocessing images (one shard each at a time)."""
    read_threads: Annotated[int, AtLeast(1)] = 4
    """Threads reading and decompressing chunks ahead of the SAE's encoder."""
    device: str = "auto"
    """Torch device for the SAE and the encoder: auto = cuda when present, else cpu."""

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.encoder and not self.encoder_weights:
            raise ValueError(
                f"--encoder {self.encoder} needs --encoder-weights: a pretrained tag, a weights "
                "file or 'none' for random weights"
            )

    @property
    def out_dir(self) -> Path:
        return AnalyzeConfig(run=self.run, out=self.out).out_dir
