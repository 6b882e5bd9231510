"""The analysis as pictures (PNG): MSE across tokens through training, how often features fire,
how spatially coherent and how monosemantic they are, and a feature's top images with its patch
activations overlaid."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa

from vitscope.analysis.files import (
    MORANS_COLUMN,
    MS_COLUMN,
    MS_FILE,
    Analysis,
    load_analysis,
    read_monosemanticity,
)
from vitscope.analysis.images import read_images
from vitscope.cache_spec.store import open_cache
from vitscope.cache_spec.tokens import CLS, TokenLayout
from vitscope.support.errors import BadSetting, MissingInput
from vitscope.support.extras import require
from vitscope.support.outputs import png_by, png_metadata
from vitscope.support.progress import status
from vitscope.support.run_log import LOG_FILE, LogRecord, read_log
from vitscope.train.token_picture import draw_tokens

require("matplotlib", "plots", "the analysis pictures")
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MAX_PANELS = 16
"""At most this many panels in the MSE-by-token figure (evenly spaced, the last one always)."""


def plot_analysis(folder: Path, shards: Path | None = None, grids: int = 4) -> list[Path]:
    """Every picture of an analysis folder (and of its run, when the SAE is a run folder)."""
    analysis = load_analysis(folder)
    status(f"drawing the pictures of {folder}")
    pictures = [plot_frequencies(analysis, folder / "frequencies.png")]
    run = Path(analysis.meta.sae)
    if (run / LOG_FILE).is_file():
        layout = analysis.meta.cache_layout
        pictures.append(plot_mse_by_token(run, layout, folder / "mse_by_token.png"))
    if MORANS_COLUMN in analysis.features.column_names:  # analysis version 1.2 on
        pictures.append(save_figure(morans_i_figure(analysis), folder / "morans_i.png"))
    if analysis.monosemanticity is not None:
        pictures.append(plot_monosemanticity(folder))
    # The features firing on the most images fill their grids: a first look at the dictionary.
    widest = np.argsort(-analysis.features["fire_images"].to_numpy(), kind="stable")[:grids]
    for feature in widest.tolist():
        if analysis.top_of(feature):
            path = folder / "grids" / f"feature_{feature:05d}.png"
            pictures.append(plot_feature_grid(analysis, feature, path, shards))
    return pictures


def plot_mse_by_token(run_dir: Path, layout: TokenLayout, out: Path) -> Path:
    """Held-out MSE of every token position as training progressed (see mse_by_token_figure)."""
    return save_figure(mse_by_token_figure(run_dir, layout), out)


def panel_windows(log: list[LogRecord], checkpoint_every: int | None) -> list[LogRecord]:
    """The logged windows the MSE figure draws: all of them when they fit in MAX_PANELS, else
    the checkpoints' windows and the last (a long run logs hundreds); evenly thinned to fit."""
    windows = log
    if checkpoint_every and len(log) > MAX_PANELS:
        at_checkpoints = [
            w
            for before, w in zip([0, *(r.tokens for r in log)], log, strict=False)
            if w.tokens // checkpoint_every > before // checkpoint_every
        ]
        if at_checkpoints:
            windows = at_checkpoints + [log[-1]] * (at_checkpoints[-1] is not log[-1])
    if len(windows) <= MAX_PANELS:
        return windows
    return [windows[round(i * (len(windows) - 1) / (MAX_PANELS - 1))] for i in range(MAX_PANELS)]


def mse_by_token_figure(run_dir: Path, layout: TokenLayout) -> plt.Figure:
    """One panel per checkpoint (or per logged window, see panel_windows), the patch grid of the
    cache's `layout` as a heatmap with CLS and each register beside it, one colour scale for all
    panels."""
    training = json.loads((run_dir / "cfg.json").read_text()).get("training", {})
    windows = panel_windows(read_log(run_dir), training.get("checkpoint_every"))
    values = np.array([w.heldout.mse_by_token for w in windows])
    if values.shape[1] != layout.n_tokens:
        raise BadSetting(
            f"{run_dir / LOG_FILE}: {values.shape[1]} token positions, but the cache analysed "
            f"has {layout.n_tokens}; analyse the SAE on the cache it was trained on"
        )
    norm = matplotlib.colors.Normalize(vmin=float(values.min()), vmax=float(values.max()))
    cols = min(len(windows), 8)
    rows = math.ceil(len(windows) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 1, 2.9 * rows + 0.4), squeeze=False)
    for ax in axes.flat[len(windows) :]:
        ax.set_axis_off()
    for ax, window, mse in zip(axes.flat, windows, values, strict=False):
        image = draw_tokens(ax, mse, layout, "magma", norm)
        ax.set_title(f"{window.tokens:,} tokens", fontsize=9)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="held-out MSE (scaled units)", shrink=0.8)
    grid_rows, grid_cols = layout.grid
    fig.suptitle(
        f"{run_dir}: reconstruction MSE by token position ({grid_rows}x{grid_cols} patches)"
    )
    return fig


def plot_frequencies(analysis: Analysis, out: Path) -> Path:
    """frequencies.png (see plot_frequencies_figure)."""
    return save_figure(plot_frequencies_figure(analysis), out)


def plot_frequencies_figure(analysis: Analysis) -> plt.Figure:
    """log10 firing frequency of the live features, over tokens and over images."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    n_features = analysis.meta.n_features
    for ax, column, over in zip(
        axes, ("freq_tokens", "freq_images"), ("tokens", "images"), strict=True
    ):
        freq = analysis.features[column].to_numpy()
        live = freq[freq > 0]
        ax.hist(np.log10(live), bins=50, color="tab:blue")
        ax.set(
            xlabel=f"log10 firing frequency over {over}",
            ylabel="features",
            title=f"{len(live):,} of {n_features:,} features fire on some {over[:-1]}",
        )
    fig.suptitle(
        f"{analysis.meta.sae}: {analysis.meta.images_seen:,} images, "
        f"{analysis.meta.tokens_seen:,} tokens of layer {analysis.meta.layer}"
    )
    return fig


def morans_i_figure(analysis: Analysis) -> plt.Figure:
    """Histogram of the features' Moran's I (ANALYSIS.md), over those that have one."""
    meta = analysis.meta
    rows, cols = meta.cache_layout.grid
    return score_histogram(
        analysis.features[MORANS_COLUMN],
        "Moran's I of the patch activations (mean over images)",
        f"of {meta.n_features:,} features measured",
        f"{meta.sae}: spatial coherence on the {rows}x{cols} grid, layer {meta.layer}",
    )


def plot_monosemanticity(folder: Path) -> Path:
    """Histogram of the features' MS (monosemanticity.png beside monosemanticity.parquet)."""
    found = read_monosemanticity(folder)
    if found is None:
        raise MissingInput(f"{folder / MS_FILE}: none; run `vitscope monosemanticity` first")
    meta, table = found
    fig = score_histogram(
        table[MS_COLUMN],
        "MonoSemanticity Score",
        f"of {meta.n_features:,} features scored",
        f"{meta.sae}: MS over {meta.n_images:,} images, layer {meta.layer}, "
        f"embeddings of {meta.encoder} ({meta.encoder_weights})",
        top=1,
    )
    return save_figure(fig, folder / "monosemanticity.png")


def score_histogram(
    column: pa.ChunkedArray, xlabel: str, of: str, suptitle: str, top: float | None = None
) -> plt.Figure:
    """Histogram of a per-feature score over the features that have one (null: none); from 0
    (or below) to `top` when given, else over the scores' range."""
    values = column.to_numpy(zero_copy_only=False).astype(np.float64)
    defined = values[~np.isnan(values)]
    fig, ax = plt.subplots(figsize=(6.5, 3.8), layout="constrained")
    span = None if top is None else (min(0.0, float(defined.min(initial=0))), top)
    ax.hist(defined, bins=50, range=span, color="tab:blue")
    mean = f", mean {defined.mean():.3f}" if len(defined) else ""
    ax.set(xlabel=xlabel, ylabel="features", title=f"{len(defined):,} {of}{mean}")
    fig.suptitle(suptitle, fontsize=9)
    return fig


FEATURE_GRID = png_by("a feature grid")


def plot_feature_grid(
    analysis: Analysis, feature: int, out: Path, shards: Path | None = None
) -> Path:
    """grids/feature_NNNNN.png (see feature_grid_figure)."""
    return save_figure(feature_grid_figure(analysis, feature, shards), out, FEATURE_GRID.what)


def feature_grid_figure(analysis: Analysis, feature: int, shards: Path | None = None) -> plt.Figure:
    """The feature's top images (3x3 for N = 9), each with its patch activations overlaid and
    its caption under it."""
    top = analysis.top_of(feature)
    if not top:
        raise BadSetting(
            f"feature {feature} never fired on the {analysis.meta.images_seen:,} analysed images; "
            "pick one with fire_images > 0 (features.parquet)"
        )
    heat_NT = analysis.heatmaps(feature)
    images = read_images(open_cache(analysis.meta.cache), [t["row"] for t in top], shards)
    columns = math.ceil(math.sqrt(len(top)))
    rows = math.ceil(len(top) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.4 * rows), squeeze=False)
    peak = float(heat_NT.max()) or 1.0
    layout = analysis.meta.layout
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for ax in axes.flat[len(top) :]:
        ax.set_axis_off()
    for ax, item, heat in zip(axes.flat, top, heat_NT, strict=False):
        image = images[item["row"]]
        ax.imshow(image)
        if layout:
            patches = heat[layout.patches].reshape(layout.grid)
            grid = np.ma.masked_equal(patches, 0)  # where it does not fire, the photo shows
            ax.imshow(
                grid,
                cmap="inferno",
                alpha=0.55,
                vmin=0,
                vmax=peak,
                extent=(0, image.width, image.height, 0),
                interpolation="nearest",
            )
        caption = textwrap.shorten(item["caption"] or item["key"], 60)
        ax.set_title(f"{item['value']:.2f}{_prefix_values(heat, layout)}", fontsize=8)
        ax.set_xlabel("\n".join(textwrap.wrap(caption, 30)), fontsize=7)
    fig.suptitle(f"feature {feature}: top {len(top)} images by peak activation")
    return fig


def _prefix_values(heat_T: np.ndarray, layout: TokenLayout | None) -> str:
    """', CLS 1.20, reg0 0.00, ...': the heatmap's prefix tokens, which the overlay leaves out
    (the CLS token alone when there is no grid)."""
    names = layout.prefix if layout else (CLS,)
    return "".join(f", {name} {value:.2f}" for name, value in zip(names, heat_T, strict=False))


def save_figure(fig: plt.Figure, out: Path, made_as: str = "") -> Path:
    """Save as PNG; `made_as` marks it (png_by) so the command that draws it may redraw it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(
        out, dpi=90, bbox_inches="tight", metadata=png_metadata(made_as) if made_as else None
    )
    plt.close(fig)
    return out
