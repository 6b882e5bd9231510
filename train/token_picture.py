"""One value per token drawn where the token is: the patches as their rows x cols grid, each prefix
token (CLS, registers) as its own labelled cell beside it, on one colour scale. Backbones differ
(no CLS in SigLIP, 4 registers in DINOv2-reg, non-square grids), so every picture of values by
token position (report.png, the analysis's MSE by token, cache-info's norms) draws through this.
"""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.image import AxesImage

from vitscope.cache_spec.tokens import TokenLayout

CELL = 0.18
"""Side of a prefix token's cell, as a share of the grid's height (smaller when many)."""
STEP = 1.15
"""From one prefix cell to the next, in cell sides."""


def draw_tokens(
    ax: Axes,
    values_T: np.ndarray,
    layout: TokenLayout,
    cmap: str,
    norm: Normalize | None = None,
) -> AxesImage:
    """The patch grid on `ax` and the prefix tokens in a column of cells to its right, each
    labelled by its name on its right; the scale spans all of `values_T` unless `norm` is
    given."""
    values_T = np.asarray(values_T, dtype=np.float64)
    norm = norm or Normalize(vmin=float(values_T.min()), vmax=float(values_T.max()))
    image = ax.imshow(values_T[layout.patches].reshape(layout.grid), cmap=cmap, norm=norm)
    side = min(CELL, 1 / (STEP * max(layout.n_prefix, 1)))
    for index, name in enumerate(layout.prefix):
        cell = ax.inset_axes((1.04, 1 - index * STEP * side - side, side, side))
        cell.imshow([[values_T[index]]], cmap=cmap, norm=norm)
        cell.yaxis.set_label_position("right")
        cell.set_ylabel(name, fontsize=7, rotation=0, ha="left", va="center")
        _bare(cell)
    _bare(ax)
    return image


def _bare(ax: Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
