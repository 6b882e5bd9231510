"""Moran's I from sparse codes (analysis/spatial.py) equals the textbook double loop over patches
and their 8 neighbours, on random activations and on patterns whose answer is known: one blob is
coherent, alternating columns reach the 8-neighbour floor, a checkerboard is neither."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import brute_morans_i
from vitscope.analysis.spatial import MAX_SHARE, MIN_PATCHES, degrees, morans_i


def sparse_morans_i(
    dense_ITF: np.ndarray, grid: int | tuple[int, int], prefix: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """What the pass computes from a chunk's firing entries (non-zero values of dense codes)."""
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    image, token, feature = np.nonzero(dense_ITF)
    features, values = morans_i(
        *(torch.from_numpy(a) for a in (image, token, feature, dense_ITF[image, token, feature])),
        n_tokens=dense_ITF.shape[1],
        grid=(rows, cols),
        n_features=dense_ITF.shape[2],
    )
    assert dense_ITF.shape[1] == prefix + rows * cols
    return features.numpy(), values.numpy()


def one_pattern(grid_a: np.ndarray) -> float:
    """Moran's I of one image, one feature, CLS before the grid (firing there too: left out)."""
    dense = np.concatenate([[7.0], grid_a.ravel()])[None, :, None]
    features, values = sparse_morans_i(dense, grid_a.shape[0])
    assert features.tolist() == [0]
    return float(values[0])


def test_random_sparse_codes_equal_the_double_loop():
    rng = np.random.default_rng(0)
    grid, n_images, n_features = 6, 5, 7
    dense = rng.random((n_images, 1 + grid * grid, n_features)) * (
        rng.random((n_images, 1 + grid * grid, n_features)) < rng.random(n_features)
    )
    features, values = sparse_morans_i(dense, grid)
    expected = []
    for image in range(n_images):
        for feature in range(n_features):
            patches = dense[image, 1:, feature].reshape(grid, grid)
            active = np.count_nonzero(patches)
            if MIN_PATCHES <= active <= int(MAX_SHARE * grid * grid):
                expected.append((feature, brute_morans_i(patches)))
    assert 20 < len(expected) < n_images * n_features  # some counted, some filtered out
    # In the pass's order: by image, then feature.
    assert features.tolist() == [feature for feature, _ in expected]
    np.testing.assert_allclose(values, [i for _, i in expected], rtol=1e-9, atol=1e-12)


def test_a_blob_is_coherent_and_a_checkerboard_is_not():
    grid = 16
    blob = np.zeros((grid, grid))
    blob[3:7, 5:9] = np.arange(1, 17).reshape(4, 4)  # a 4x4 square, values varying inside
    square = np.zeros((grid, grid))
    square[3:7, 5:9] = 1
    rows, cols = np.indices((grid, grid))
    checkerboard = ((rows + cols) % 2).astype(float)
    columns = (cols % 2).astype(float)
    for pattern in (blob, square, checkerboard, columns):
        assert one_pattern(pattern) == pytest.approx(brute_morans_i(pattern), rel=1e-12)
    assert one_pattern(square) == pytest.approx(0.6906, abs=1e-4)
    assert one_pattern(blob) > 0.5
    # With 8 neighbours, diagonal neighbours of a checkerboard are alike: I is near 0 (−1 holds
    # for 4 neighbours only); alternating columns are the most unlike neighbours can be.
    assert one_pattern(checkerboard) == pytest.approx(-1 / 31)
    assert one_pattern(columns) == pytest.approx(-0.4839, abs=1e-4)


def test_too_few_or_too_many_patches_do_not_count():
    grid = 8
    few = np.zeros((grid, grid))
    few.flat[: MIN_PATCHES - 1] = 1.0
    most = np.ones((grid, grid))
    most.flat[: grid * grid - int(MAX_SHARE * grid * grid) - 1] = 0.0
    enough = few.copy()
    enough.flat[MIN_PATCHES] = 2.0
    dense = np.stack([np.concatenate([[0.0], p.ravel()]) for p in (few, most, enough)])[..., None]
    features, values = sparse_morans_i(dense, grid)
    assert features.tolist() == [0]  # only `enough`
    assert values[0] == pytest.approx(brute_morans_i(enough))


def test_patches_only_and_no_grid():
    """Without CLS the whole token row is the grid; a CLS-only SAE has no grid: nothing."""
    rng = np.random.default_rng(1)
    patches = rng.random((4, 4)) * (rng.random((4, 4)) < 0.5)
    dense = patches.reshape(1, 16, 1)
    _, values = sparse_morans_i(dense, 4, prefix=0)
    assert values.tolist() == pytest.approx([brute_morans_i(patches)])
    assert sparse_morans_i(np.ones((3, 1, 2)), 1, prefix=0)[0].size == 0


def test_degrees_count_the_8_neighbours():
    assert degrees((3, 3)).reshape(3, 3).tolist() == [[3, 5, 3], [5, 8, 5], [3, 5, 3]]
    assert degrees((2, 3)).reshape(2, 3).tolist() == [[3, 5, 3], [3, 5, 3]]


def test_a_grid_of_rows_by_cols_after_registers_equals_the_double_loop():
    """DINOv2-reg's layout: CLS and 4 registers (left out, firing or not), then 3 x 4 patches;
    a square reading of the same 16 tokens (4 x 4 after CLS) would give other numbers."""
    rng = np.random.default_rng(2)
    rows, cols, prefix, n_images = 3, 4, 5, 6
    dense = rng.random((n_images, prefix + rows * cols, 1)) * (
        rng.random((n_images, prefix + rows * cols, 1)) < 0.6
    )
    features, values = sparse_morans_i(dense, (rows, cols), prefix=prefix)
    expected = []
    for image in range(n_images):
        patches = dense[image, prefix:, 0].reshape(rows, cols)
        if MIN_PATCHES <= np.count_nonzero(patches) <= int(MAX_SHARE * rows * cols):
            expected.append(brute_morans_i(patches))
    assert len(expected) >= 3 and features.tolist() == [0] * len(expected)
    np.testing.assert_allclose(values, expected, rtol=1e-9, atol=1e-12)
    blob = np.zeros((rows, cols))
    blob[:, :2] = [[1, 2], [3, 4], [5, 6]]  # the left half: coherent on 3 x 4
    dense = np.concatenate([np.full(prefix, 9.0), blob.ravel()])[None, :, None]
    assert sparse_morans_i(dense, (rows, cols), prefix=prefix)[1].tolist() == pytest.approx(
        [brute_morans_i(blob)]
    )
    assert brute_morans_i(blob) > 0.2
