"""Per-feature statistics and top-N images, accumulated chunk by chunk in bounded memory.

Shapes: C images of a chunk, T tokens each, K active latents per token, F features, N top images.
Memory is O(F·N·T) for the heatmaps of the top images (float16: 303 MB at F = 65,536, N = 9,
T = 257) plus O(C·F) per chunk; never the cache, never a dense (tokens × F) matrix. Moran's I of
every (image, feature) comes from the same sparse entries (analysis/spatial.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from vitscope.analysis.spatial import morans_i

FEATURE_BLOCK = 4096
"""Features merged at once when top images change (bounds the (block, N + C, T) buffer)."""


@dataclass
class FeatureAccumulator:
    """Running sums per feature, and per feature its N best images with their token maps."""

    fire_tokens_F: Tensor
    fire_images_F: Tensor
    act_sum_F: Tensor
    act_max_F: Tensor
    morans_sum_F: Tensor
    """Sum of Moran's I over the images that count for the feature (analysis/spatial.py)."""
    morans_images_F: Tensor
    """How many images those are."""
    top_values_FN: Tensor
    """Each top image's peak activation (max over its tokens), best first; -inf = empty slot."""
    top_rows_FN: Tensor
    """Their cache rows; -1 = empty slot."""
    top_heat_FNT: Tensor
    """The feature's activation on every token of each top image (float16; 0 where inactive)."""

    @classmethod
    def empty(cls, n_features: int, top_n: int, n_tokens: int) -> FeatureAccumulator:
        return cls(
            fire_tokens_F=torch.zeros(n_features, dtype=torch.long),
            fire_images_F=torch.zeros(n_features, dtype=torch.long),
            act_sum_F=torch.zeros(n_features, dtype=torch.float64),
            act_max_F=torch.full((n_features,), float("-inf")),
            morans_sum_F=torch.zeros(n_features, dtype=torch.float64),
            morans_images_F=torch.zeros(n_features, dtype=torch.long),
            top_values_FN=torch.full((n_features, top_n), float("-inf")),
            top_rows_FN=torch.full((n_features, top_n), -1, dtype=torch.long),
            top_heat_FNT=torch.zeros(n_features, top_n, n_tokens, dtype=torch.float16),
        )

    def tensors(self) -> dict[str, Tensor]:
        """Every accumulator by name (what a resume state holds)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def add(
        self,
        idx_CTK: Tensor,
        values_CTK: Tensor,
        fired_CTK: Tensor,
        rows_C: Tensor,
        grid: tuple[int, int] | None,
    ) -> None:
        """Fold in one chunk's sparse codes (`fired` marks entries that count as firing); the
        last rows x cols of the T tokens are the patch `grid` (None: no grid, no Moran's I)."""
        n_images, n_tokens, _ = idx_CTK.shape
        n_features = self.fire_tokens_F.shape[0]
        image = torch.arange(n_images).view(-1, 1, 1).expand_as(idx_CTK)[fired_CTK]
        token = torch.arange(n_tokens).view(1, -1, 1).expand_as(idx_CTK)[fired_CTK]
        feature, value = idx_CTK[fired_CTK], values_CTK[fired_CTK].float()

        peak_CF = torch.full((n_images, n_features), float("-inf"))
        peak_CF.view(-1).scatter_reduce_(0, image * n_features + feature, value, "amax")
        self.fire_tokens_F += torch.bincount(feature, minlength=n_features)
        self.fire_images_F += torch.isfinite(peak_CF).sum(dim=0)
        self.act_sum_F += torch.bincount(feature, weights=value.double(), minlength=n_features)
        self.act_max_F = torch.maximum(self.act_max_F, peak_CF.amax(dim=0))
        if grid is not None:
            counted, moran = morans_i(image, token, feature, value, n_tokens, grid, n_features)
            self.morans_sum_F.index_add_(0, counted, moran)
            self.morans_images_F += torch.bincount(counted, minlength=n_features)

        entering = peak_CF > self.top_values_FN[:, -1]
        touched = entering.any(dim=0).nonzero().squeeze(1)
        for start in range(0, len(touched), FEATURE_BLOCK):
            block = touched[start : start + FEATURE_BLOCK]
            self._merge(block, peak_CF, entering, rows_C, (image, token, feature, value))

    def _merge(
        self,
        block: Tensor,
        peak_CF: Tensor,
        entering_CF: Tensor,
        rows_C: Tensor,
        entries: tuple[Tensor, Tensor, Tensor, Tensor],
    ) -> None:
        """Re-rank the block's features over their N kept images plus this chunk's entrants;
        only the entrants' token maps are built, from the chunk's sparse entries."""
        image, token, feature, value = entries
        n_images = peak_CF.shape[0]
        top_n, n_tokens = self.top_heat_FNT.shape[1:]
        new_values = peak_CF[:, block].T.masked_fill(~entering_CF[:, block].T, float("-inf"))
        best = torch.cat([self.top_values_FN[block], new_values], dim=1).topk(top_n, dim=1)
        kept = best.indices < top_n  # a slot that keeps (possibly moves) an image it had
        empty = ~torch.isfinite(best.values)
        old = best.indices.clamp(max=top_n - 1)
        heat = self.top_heat_FNT[block].gather(1, old[..., None].expand(-1, -1, n_tokens))
        heat[~kept | empty] = 0
        rows = self.top_rows_FN[block].gather(1, old)
        rows = torch.where(kept, rows, rows_C[(best.indices - top_n).clamp(min=0)])

        # Where each entrant (feature in block, chunk image) landed: its rank, or -1.
        slot_F = torch.full((peak_CF.shape[1],), -1, dtype=torch.long)
        slot_F[block] = torch.arange(len(block))
        rank_BC = torch.full((len(block), n_images), -1, dtype=torch.long)
        entrant = (~kept & ~empty).nonzero(as_tuple=True)
        rank_BC[entrant[0], best.indices[entrant] - top_n] = entrant[1]
        in_block = slot_F[feature]
        mine = in_block >= 0
        rank = rank_BC[in_block[mine], image[mine]]
        landed = rank >= 0
        heat[in_block[mine][landed], rank[landed], token[mine][landed]] = value[mine][landed].half()

        self.top_values_FN[block] = best.values
        self.top_rows_FN[block] = rows.masked_fill(empty, -1)
        self.top_heat_FNT[block] = heat
