"""A picture of a cache's token norms, layer by layer: how large the residual stream is at every
token position, how the norms are distributed, and where the outlier tokens sit.

ViTs grow a few high-norm tokens and a distinct CLS token with depth; this is the first thing to
look at before training SAEs on a layer. Drawn from cache-info's sample (cache_spec/outliers.py).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from vitscope.cache_spec.outliers import OUTLIER_RATIO, LayerNorms
from vitscope.cache_spec.store import Cache
from vitscope.cache_spec.tokens import TokenLayout
from vitscope.support.errors import MissingInput
from vitscope.support.outputs import png_by, png_metadata
from vitscope.train.token_picture import draw_tokens

CACHE_PLOT = png_by("a cache-info plot")


def plot_cache(cache: Cache, layers: list[LayerNorms], out: Path) -> Path:
    """Per layer (a column): mean norm by patch position on the image grid (CLS and registers
    each a cell beside it), the histogram of token norms (median and outlier threshold marked),
    and the share of each position's tokens that are outliers."""
    if not layers:
        raise MissingInput(f"{cache.path}: no committed rows to plot")
    fig, axes = plt.subplots(3, len(layers), figsize=(3.4 * len(layers), 9.6), squeeze=False)
    for column, stats in zip(axes.T, layers, strict=True):
        mean_T = stats.norms_NT.mean(axis=0)
        _by_position(fig, column[0], mean_T, stats.layout, "viridis")
        column[0].set_title(f"layer {stats.layer}: mean |x|{_cls(mean_T, stats.layout, '.3g')}")
        _histogram(column[1], stats)
        share_T = stats.outliers_NT.mean(axis=0)
        _by_position(fig, column[2], share_T, stats.layout, "magma")
        column[2].set_title(f"outlier share by position{_cls(share_T, stats.layout, '.0%')}")
    fig.suptitle(f"{cache.path}: token norms ({cache.attrs.model})")
    fig.tight_layout()
    fig.savefig(out, dpi=90, metadata=png_metadata(CACHE_PLOT.what))
    plt.close(fig)
    return out


def _by_position(
    fig: plt.Figure, ax: plt.Axes, value_T: np.ndarray, layout: TokenLayout, cmap: str
) -> None:
    """Patch values on the image grid, the prefix tokens each a labelled cell beside it."""
    image = draw_tokens(ax, value_T, layout, cmap)
    fig.colorbar(image, ax=ax, fraction=0.046, location="left")


def _cls(value_T: np.ndarray, layout: TokenLayout, spec: str) -> str:
    """', CLS <value>' for a title, or nothing for a model without CLS."""
    return f", CLS {value_T[layout.cls_index]:{spec}}" if layout.has_cls else ""


def _histogram(ax: plt.Axes, stats: LayerNorms) -> None:
    norms = stats.norms_NT.ravel()
    low, high = max(norms.min(), 1e-6), max(norms.max(), OUTLIER_RATIO * stats.median)
    ax.hist(norms, bins=np.geomspace(low, high * 1.05, 60), log=True)
    ax.set_xscale("log")
    ax.axvline(stats.median, color="k", lw=1, label=f"median {stats.median:.3g}")
    ax.axvline(OUTLIER_RATIO * stats.median, color="r", lw=1, label=f"{OUTLIER_RATIO:g}x median")
    ax.legend(fontsize=7)
    ax.set_xlabel("token norm")
    ax.set_title(f"gamma {stats.gamma:.3g}, {stats.outlier_share:.2%} outliers")
