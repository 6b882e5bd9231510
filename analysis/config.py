"""Settings of the analysis commands (analyze, monosemanticity, compare, grid, browse, search,
splice): one frozen dataclass per command."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from vitscope.support.configs import AtLeast, check_bounds
from vitscope.support.errors import BadSetting
from vitscope.support.shared_options import Device, Overwrite, Resume, Shards


def beside_run(run: str, name: str) -> Path:
    """A default output: `name` inside the run folder, or in ./ for an SAE that is not a folder
    (a CLIP-Scope .pt, a hub id)."""
    return Path(run) / name if Path(run).is_dir() else Path(name)


@dataclass(frozen=True)
class AnalyzeConfig(Shards, Device, Resume, Overwrite):
    """One streaming pass of an SAE over its cache: statistics and top images per feature."""

    run: str
    """The SAE: a run folder, an SAE folder, a CLIP-Scope .pt or a hub id."""
    cache: str = ""
    """The cache to encode; empty = the cache the SAE was trained on (its cfg.json says)."""
    out: str = ""
    """Analysis folder; empty = RUN/analysis (or ./analysis for a non-folder SAE)."""
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

    def __post_init__(self) -> None:
        check_bounds(self)

    @property
    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        return beside_run(self.run, "analysis")


@dataclass(frozen=True)
class MonosemanticityConfig(Shards, Device, Overwrite):
    """The MonoSemanticity Score of every feature of an SAE over the images of a cache."""

    run: str
    """The SAE: a run folder, an SAE folder, a CLIP-Scope .pt or a hub id."""
    cache: str = ""
    """The evaluation images' cache; empty = the cache the SAE was trained on."""
    out: str = ""
    """Analysis folder to write into; empty = RUN/analysis (or ./analysis for a non-folder SAE)."""
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
    labels: str = ""
    """Words that name the features, one label a line; empty = ImageNet's class names (on a CPU
    their 7,000 prompts take minutes through a large text tower)."""
    top_labels: Annotated[int, AtLeast(0)] = 5
    """Labels kept per feature, by the encoder's text tower (a CLIP model's; skipped for one
    without); 0 = name none."""

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.encoder and not self.encoder_weights:
            raise BadSetting(
                f"--encoder {self.encoder} needs --encoder-weights: a pretrained tag, a weights "
                "file or 'none' for random weights"
            )

    @property
    def out_dir(self) -> Path:
        return AnalyzeConfig(run=self.run, out=self.out).out_dir


@dataclass(frozen=True)
class CompareConfig(Overwrite):
    """SAEs on different layers of one cache, side by side."""

    runs: tuple[str, ...]
    """Run folders, one per layer of one cache."""
    out: str = "runs/compare"
    """Folder for compare.md, .csv and .png."""
    judge: Literal["clip", "http", "human"] = "clip"
    """Whose sort-eval score the table shows (RUN/sorteval-JUDGE-TOKEN)."""
    token: Literal["all", "cls"] = "all"
    """The token set of that sort-eval score."""


@dataclass(frozen=True)
class GridConfig(Shards, Overwrite):
    """One feature's top images with their patch activations overlaid."""

    analysis: str
    """An analysis folder (RUN/analysis)."""
    feature: Annotated[int, AtLeast(0)]
    """The feature (latent index)."""
    out: str = ""
    """PNG to write; empty = ANALYSIS/grids/feature_NNNNN.png."""

    def __post_init__(self) -> None:
        check_bounds(self)

    @property
    def out_path(self) -> Path:
        return Path(self.out or Path(self.analysis) / "grids" / f"feature_{self.feature:05d}.png")


@dataclass(frozen=True)
class BrowseConfig(Shards, Overwrite):
    """The static feature browser of an analysis."""

    run: str
    """The run folder that was analysed."""
    analysis: str = ""
    """Analysis folder; empty = RUN/analysis."""
    out: str = ""
    """Site folder; empty = RUN/browser. A browser written before is replaced."""
    serve: bool = False
    """Then serve the site on 127.0.0.1."""
    port: Annotated[int, AtLeast(0)] = 0
    """Port for --serve; 0 = a free one."""

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass(frozen=True)
class SearchConfig(Device):
    """The features whose images' embedding is nearest a text's, under the text tower of the
    model that named them (`vitscope monosemanticity`)."""

    run: str
    """The SAE that was scored: a run folder (or what `vitscope monosemanticity` was given)."""
    text: str
    """Any text: "a red car"; embedded in the same prompts as the vocabulary."""
    analysis: str = ""
    """Analysis folder; empty = RUN/analysis (or ./analysis for a non-folder SAE)."""
    top: Annotated[int, AtLeast(1)] = 10
    """Features listed, nearest first."""

    def __post_init__(self) -> None:
        check_bounds(self)

    @property
    def folder(self) -> Path:
        return AnalyzeConfig(run=self.run, out=self.analysis).out_dir


@dataclass(frozen=True)
class SpliceConfig(Shards, Device, Overwrite):
    """The SAE's reconstruction spliced into its layer, scored against clean and ablated runs."""

    run: str
    """The SAE: run folder, CLIP-Scope .pt or hub id."""
    cache: str = ""
    """Cache whose images to use; empty = the SAE's training cache."""
    images: Annotated[int, AtLeast(1)] = 256
    """The first N committed rows' images."""
    labels: str = ""
    """Zero-shot labels, one a line; empty = ImageNet's."""
    out: str = ""
    """JSON to write; empty = RUN/splice.json (./splice.json for a non-folder SAE)."""

    def __post_init__(self) -> None:
        check_bounds(self)

    @property
    def out_path(self) -> Path:
        if self.out:
            return Path(self.out)
        return beside_run(self.run, "splice.json")


@dataclass(frozen=True)
class ConsistencyConfig(Device, Overwrite):
    """Two SAEs of one layer and width (e.g. two seeds): their latents matched one-to-one."""

    run_a: str
    """The first SAE: a run folder, an SAE folder, a CLIP-Scope .pt or a hub id."""
    run_b: str
    """The second, of the same layer, d_in and width."""
    out: str = ""
    """Folder for consistency.json, .md, .png and matches.parquet; empty = RUN_A/consistency-NAME
    (NAME: RUN_B's last path part), or ./consistency-NAME for a non-folder RUN_A."""
    cache: str = ""
    """Cache to measure firing frequencies on for a run without an analysis; empty = the cache
    RUN_A was trained on."""
    images: Annotated[int, AtLeast(0)] = 256
    """Images (the cache's first whole chunks) encoded for those frequencies; 0 = none, no
    frequency split for a run without an analysis."""

    def __post_init__(self) -> None:
        check_bounds(self)

    @property
    def out_dir(self) -> Path:
        """--out, else a folder in RUN_A named after RUN_B (in ./ for a non-folder RUN_A)."""
        name = f"consistency-{Path(self.run_b).name.removesuffix('.pt')}"
        return Path(self.out) if self.out else beside_run(self.run_a, name)
