"""Outlier tokens of a cache: how large a layer's mean is against its spread, and which tokens
carry norms far above the rest (`vitscope cache-info`, `--plot`).

ViTs put very high norms on a few "register" tokens (CLIP included; arXiv 2506.08010), and the
ratio γ = ‖mean‖ / ‖std‖ of a layer's activations predicts how many latents of an SAE start dead
(arXiv 2605.31518). Both are read from a bounded sample of chunks spread evenly over the cache,
so the report costs seconds on a cache of any size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from vitscope.cache_spec.store import Cache, ChunkRef
from vitscope.cache_spec.tokens import TokenLayout

OUTLIER_RATIO = 10.0
"""A token whose norm is above this many times the layer's median token norm is an outlier."""

SAMPLE_CHUNKS = 8
"""Chunks per layer the statistics read by default, spread evenly over the committed ones."""


@dataclass(frozen=True)
class LayerNorms:
    """One layer's token-norm statistics over the sampled images (all T tokens of each)."""

    layer: int
    gamma: float
    """‖mean‖ / ‖std‖: the norm of the mean activation over the norm of the vector of
    per-dimension standard deviations (population std), over every sampled token."""
    norms_NT: np.ndarray
    """L2 norm of every sampled token, by image and position (positions as in `layout`)."""
    layout: TokenLayout
    """Which token each position is: the prefix tokens (CLS, registers), then the patches."""

    @property
    def median(self) -> float:
        return float(np.median(self.norms_NT))

    @property
    def p99(self) -> float:
        return float(np.quantile(self.norms_NT, 0.99))

    @property
    def max(self) -> float:
        return float(self.norms_NT.max())

    @property
    def outliers_NT(self) -> np.ndarray:
        """Tokens above OUTLIER_RATIO times the median norm."""
        return self.norms_NT > OUTLIER_RATIO * self.median

    @property
    def outlier_share(self) -> float:
        return float(self.outliers_NT.mean())

    def outlier_positions(self, most: int = 3) -> list[tuple[int, float]]:
        """The positions holding most outliers, with each one's share of all of them."""
        count_T = self.outliers_NT.sum(axis=0)
        total = int(count_T.sum())
        order = np.argsort(-count_T, kind="stable")[:most]
        return [(int(t), count_T[t] / total) for t in order if count_T[t]]

    def position_name(self, position: int) -> str:
        """'cls', 'reg0', ... for the prefix tokens, 'patch r,c' for the patches."""
        name = self.layout.position_names()[position]
        return name if position < self.layout.n_prefix else f"patch {name}"

    def lines(self) -> list[str]:
        """Two lines for cache-info."""
        at = ", ".join(
            f"{t} = {self.position_name(t)} ({share:.0%})" for t, share in self.outlier_positions()
        )
        return [
            f"  layer {self.layer}: gamma = |mean| / |std| = {self.gamma:.3g} (std per dimension); "
            f"token norm median {self.median:.4g}, p99 {self.p99:.4g}, max {self.max:.4g}",
            f"    {self.outlier_share:.2%} of tokens above {OUTLIER_RATIO:g}x the median"
            + (f", at positions {at} (share of them)" if at else ""),
        ]


def sample_chunks(cache: Cache, n_chunks: int) -> list[ChunkRef]:
    """Up to `n_chunks` committed chunks spread evenly over the cache, in row order."""
    refs = cache.chunks()
    if len(refs) <= n_chunks:
        return refs
    return [refs[i] for i in np.linspace(0, len(refs) - 1, n_chunks).round().astype(int)]


def norm_lines(cache: Cache, layers: list[LayerNorms], n_chunks: int = SAMPLE_CHUNKS) -> list[str]:
    """cache-info's section: what was sampled, then two lines per layer."""
    images = len(layers[0].norms_NT) if layers else 0
    read = len(sample_chunks(cache, n_chunks))
    return [
        f"token norms of {images} images ({read} of {len(cache.chunks())} chunks, spread evenly; "
        f"--sample-chunks), outliers above {OUTLIER_RATIO:g}x the median norm:",
        *(line for layer in layers for line in layer.lines()),
    ]


def layer_norms(cache: Cache, n_chunks: int = SAMPLE_CHUNKS) -> Iterator[LayerNorms]:
    """Each cached layer's statistics over the same sampled chunks, read one at a time: memory
    holds one chunk and the norms, never the sample."""
    from tqdm import tqdm

    refs = sample_chunks(cache, n_chunks)
    with tqdm(total=len(refs) * len(cache.attrs.layers), unit="chunk", desc="norms") as progress:
        for layer in cache.attrs.layers:
            moments, norms = _Moments(), []
            for ref in refs:
                acts_ND = cache.read_chunk(layer, ref).double().reshape(-1, cache.attrs.d_model)
                moments.add(acts_ND.numpy())
                norms.append(acts_ND.norm(dim=1).view(ref.n_rows, -1).numpy())
                progress.update()
            yield LayerNorms(layer, moments.gamma, np.concatenate(norms), cache.attrs.token_layout)


class _Moments:
    """Per-dimension mean and variance in float64, shifted by the first chunk's mean so a large
    mean (a ViT's residual stream has one) costs no precision."""

    def __init__(self) -> None:
        self.n = 0
        self.shift_D: np.ndarray | None = None
        self.sum_D: np.ndarray | float = 0.0
        self.squares_D: np.ndarray | float = 0.0

    def add(self, acts_ND: np.ndarray) -> None:
        if self.shift_D is None:
            self.shift_D = acts_ND.mean(axis=0)
        centred = acts_ND - self.shift_D
        self.sum_D = self.sum_D + centred.sum(axis=0)
        self.squares_D = self.squares_D + (centred**2).sum(axis=0)
        self.n += len(acts_ND)

    @property
    def gamma(self) -> float:
        assert self.shift_D is not None
        mean_D = self.sum_D / self.n
        variance_D = np.maximum(self.squares_D / self.n - mean_D**2, 0.0)
        return float(np.linalg.norm(mean_D + self.shift_D) / np.sqrt(variance_D.sum()))
