"""Spatial coherence of features: Moran's I of a feature's activations on the patch grid, per
(image, feature), from a chunk's sparse codes (ViSAEBench's metric M1).

    I = (n / W) · Σ_ij w_ij z_i z_j / Σ_i z_i²,   z = a − mean(a) over the n = rows·cols patches,

w_ij = 1 for the 8 neighbours of a patch (queen contiguity), W = Σ_ij w_ij. Only the patches a
feature fires on carry a value (a = 0 elsewhere), so every sum reduces to sums over those
entries: with S1 = Σ a, S2 = Σ a², D = Σ deg_i a_i and X = Σ over neighbouring pairs a_i a_j,
Σ_ij w_ij z_i z_j = 2X − 2·(S1/n)·D + (S1/n)²·W and Σ z_i² = S2 − S1²/n. X comes from one sort
of the entries by (image, feature, patch) and a binary search for each of four neighbours.
"""

from __future__ import annotations

import torch
from torch import Tensor

MIN_PATCHES = 5
"""An image counts for a feature when the feature fires on at least this many of its patches
(ViSAEBench's min_active_patches: fewer say little about a shape) ..."""
MAX_SHARE = 0.9
"""... and on at most this share of them (its max_active_fraction: a feature on nearly every
patch is background, coherent by construction). Between the two the variance is never 0."""
FORWARD = ((0, 1), (1, -1), (1, 0), (1, 1))
"""Half of the 8 neighbour offsets (row, column): each neighbouring pair is found once."""


def degrees(grid: tuple[int, int]) -> Tensor:
    """Neighbours of each patch of a (rows, cols) grid (8 inside, 5 on an edge, 3 in a corner;
    fewer on a grid one patch wide), row-major."""
    rows, cols = grid
    inside = torch.ones(rows + 2, cols + 2)
    inside[0] = inside[-1] = inside[:, 0] = inside[:, -1] = 0
    counts = torch.nn.functional.conv2d(inside[None, None], torch.ones(1, 1, 3, 3))[0, 0]
    return (counts - 1).flatten().double()


def morans_i(
    image: Tensor,
    token: Tensor,
    feature: Tensor,
    value: Tensor,
    n_tokens: int,
    grid: tuple[int, int],
    n_features: int,
) -> tuple[Tensor, Tensor]:
    """Moran's I of every (image, feature) of a chunk that counts (MIN_PATCHES, MAX_SHARE),
    from its firing entries (image in the chunk, token, feature, value): the features and their
    I (float64), one per such image. The (rows, cols) grid is the last rows·cols tokens; CLS and
    any other prefix token before them are left out."""
    rows, cols = grid
    n = rows * cols
    on_grid = token >= n_tokens - n
    patch = token[on_grid] - (n_tokens - n)
    key = (image[on_grid] * n_features + feature[on_grid]) * n + patch
    key, order = key.sort()
    value = value[on_grid][order].double()
    pair, inverse, active = torch.unique_consecutive(
        key // n, return_inverse=True, return_counts=True
    )
    counted = (active >= MIN_PATCHES) & (active <= int(MAX_SHARE * n))
    kept = counted[inverse]
    key, value, group = key[kept], value[kept], inverse[kept]
    if not len(key):
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
    patch = key % n
    row, col = patch // cols, patch % cols
    deg = degrees(grid)
    sums = torch.zeros(4, len(pair), dtype=torch.float64)
    for s, weight in enumerate((value, value * value, deg[patch] * value)):
        sums[s].index_add_(0, group, weight)
    for dr, dc in FORWARD:
        inside = (row + dr < rows) & (col + dc >= 0) & (col + dc < cols)
        target = key + dr * cols + dc
        found = torch.searchsorted(key, target).clamp(max=len(key) - 1)
        hit = inside & (key[found] == target)
        sums[3].index_add_(0, group[hit], value[hit] * value[found[hit]])
    total, squares, weighted, cross = sums[:, counted]
    weights = float(deg.sum())
    mean = total / n
    spatial = 2 * cross - 2 * mean * weighted + mean * mean * weights
    spread = squares - total * mean
    return (pair[counted] % n_features), (n / weights) * spatial / spread
