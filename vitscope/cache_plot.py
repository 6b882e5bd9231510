"""A picture of a cache: how large the residual stream is at every token position, layer by layer.

ViTs grow a few high-norm tokens and a distinct CLS token with depth; this is the first thing to
look at before training SAEs on a layer. Reads only the first chunks of each layer.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from vitscope.cache_spec.store import Cache
from vitscope.support.errors import MissingInput
from vitscope.support.outputs import png_by, png_metadata

CACHE_PLOT = png_by("a cache-info plot")


def token_norms(cache: Cache, layer: int, max_chunks: int) -> list[float]:
    """Mean L2 norm of the activation at each token position, over the first chunks' images."""
    chunks = cache.chunks()[:max_chunks]
    if not chunks:
        raise MissingInput(f"{cache.path}: no committed rows to plot")
    acts = [cache.read_chunk(layer, ref) for ref in chunks]
    total = sum(a.norm(dim=2).sum(dim=0) for a in acts)
    return (total / sum(len(a) for a in acts)).tolist()


def plot_cache(cache: Cache, out: Path, max_chunks: int = 4) -> Path:
    """One panel per layer: patch norms on the image grid, the CLS norm in the title."""
    layers = cache.attrs.layers
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3.4), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        norms = token_norms(cache, layer, max_chunks)
        side = math.isqrt(len(norms) - 1)
        if side * side == len(norms) - 1:
            grid = [norms[1 + row * side : 1 + (row + 1) * side] for row in range(side)]
            image = ax.imshow(grid, cmap="viridis")
            fig.colorbar(image, ax=ax, fraction=0.046)
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            ax.bar(range(len(norms)), norms)
        ax.set_title(f"layer {layer}: CLS {norms[0]:.3g}")
    fig.suptitle(f"{cache.path}: mean |x| by patch position ({cache.attrs.model})")
    fig.tight_layout()
    fig.savefig(out, dpi=90, metadata=png_metadata(CACHE_PLOT.what))
    plt.close(fig)
    return out
