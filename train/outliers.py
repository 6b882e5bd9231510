"""Outlier tokens in training: which tokens count as outliers (a norm far above the median), the
held-out MSE on them apart from the ordinary ones, and `--exclude-outlier-tokens`, which leaves
them out of training and evaluation.

ViTs put very high norms on a few "register" tokens (arXiv 2506.08010); an SAE trained on them
spends latents and loss on a handful of tokens. The median is the held-out tokens' (raw, as
cached): fixed for the whole run, and the same after a resume, since the held-out images are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vitscope.cache_spec.outliers import OUTLIER_RATIO


@dataclass(frozen=True)
class TokenNorms:
    """The run's norm thresholds, as multiples of the held-out median token norm."""

    median: float
    """Median L2 norm of the held-out tokens trained on, in the cache's units."""
    exclude_ratio: float = 0.0
    """`exclude_outlier_tokens`: tokens above this many medians are left out; 0 = none."""

    @classmethod
    def of(cls, heldout_NTD: torch.Tensor, token_slice: slice, exclude_ratio: float) -> TokenNorms:
        """The run's thresholds, from the chosen tokens of the held-out images."""
        return cls.of_tokens(heldout_NTD[:, token_slice].flatten(0, 1), exclude_ratio)

    @classmethod
    def of_tokens(cls, acts_ND: torch.Tensor, exclude_ratio: float) -> TokenNorms:
        norms = acts_ND.float().norm(dim=1)
        median = float(norms.median()) if norms.numel() else math.nan
        return cls(median, exclude_ratio)

    @property
    def outlier_above(self) -> float:
        """Where the held-out MSE splits outlier from ordinary tokens: the exclusion threshold,
        or cache-info's 10x the median when nothing is excluded."""
        return (self.exclude_ratio or OUTLIER_RATIO) * self.median

    @property
    def exclude_above(self) -> float:
        return self.exclude_ratio * self.median if self.exclude_ratio else math.inf

    def kept(self, acts_BD: torch.Tensor) -> torch.Tensor:
        """The tokens of a batch (raw activations) at or below the exclusion threshold."""
        if not self.exclude_ratio:
            return acts_BD
        return acts_BD[acts_BD.norm(dim=1) <= self.exclude_above]

    def record(self) -> dict[str, float | None]:
        """For the card's training dict: the thresholds in the cache's units."""
        return {
            "median_token_norm": self.median,
            "excluded_above_norm": self.exclude_above if self.exclude_ratio else None,
        }
