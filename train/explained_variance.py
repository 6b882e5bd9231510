"""Two explained variances of held-out reconstructions, both in the activations' own units.

The standard one (Gao et al. 2024; saev's normalized MSE; SAELens since its 2026 fix) is a ratio
of sums: FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖², x̄ the held-out data's mean vector, explained variance =
1 − FVU. Predicting x̄ for every token gives 0.

CLIP-Scope's model card (layer 20: .706) reports sache's number instead, a mean of per-token
ratios in standardised units. As read in Lewington-pitsos/sache, `sache/train.py`,
`training_step`: with `batch_norm` (the default) each training batch is standardised per
dimension, z = (x − mean_B) / (std_B + 1e-6) (torch's unbiased std over the batch's tokens); the
SAE reconstructs z; and the logged `explained_variance` is the mean over the batch's tokens of
1 − ‖z − ẑ‖² / ‖z − mean over dims of z‖², each token centred on its own scalar mean. (An older
script of the repository divided by ‖z‖², uncentred; `sache/model.py`'s SAEs do no
normalising of their own.) `clipscope_ev` computes exactly that, with one difference of batch:
sache's is each 4,096-token training batch just before its step, ours is all held-out tokens
standardised together (their mean and unbiased std), so the number does not depend on how the
evaluation is batched. Every sum is in float64 and merges exactly across batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vitscope.saes.sae import STANDARDIZE_EPS


@dataclass
class Moments:
    """Count, mean and summed squared deviations per dimension of the vectors of any number of
    batches, merged in float64 by Chan et al.'s pairwise update: the totals do not depend on how
    the vectors were split into batches, and a large mean costs no precision."""

    count: int = 0
    mean_D: Tensor | None = None
    m2_D: Tensor | None = None

    def add(self, x_BD: Tensor) -> None:
        if len(x_BD) == 0:
            return
        x_BD = x_BD.double()
        n, mean_D = len(x_BD), x_BD.mean(dim=0)
        m2_D = (x_BD - mean_D).pow(2).sum(dim=0)
        if self.mean_D is None or self.m2_D is None:
            self.count, self.mean_D, self.m2_D = n, mean_D, m2_D
            return
        total = self.count + n
        delta_D = mean_D - self.mean_D
        self.mean_D = self.mean_D + delta_D * (n / total)
        self.m2_D = self.m2_D + m2_D + delta_D.pow(2) * (self.count * n / total)
        self.count = total

    def total_variance(self) -> Tensor:
        """Σ‖x − x̄‖² over every vector seen."""
        assert self.m2_D is not None, "no vectors were added"
        return self.m2_D.sum()

    def std_D(self) -> Tensor:
        """Per-dimension standard deviation, unbiased (as torch.std)."""
        assert self.m2_D is not None, "no vectors were added"
        return (self.m2_D / (self.count - 1)).sqrt()


@dataclass
class ExplainedVariance:
    """Both explained variances of reconstructions of the vectors `data` summarised, fed batch by
    batch (`add`) in any split."""

    data: Moments
    """The evaluated vectors' own moments, from a pass before (CLIP-Scope's needs their std)."""
    error: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    """Σ‖x − x̂‖²."""
    explained_by_token: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    """Σ over tokens of sache's 1 − ‖z − ẑ‖² / ‖z − mean over dims of z‖²."""
    tokens: int = 0

    def add(self, acts_BD: Tensor, recon_BD: Tensor) -> None:
        if len(acts_BD) == 0:
            return
        assert self.data.mean_D is not None, "the data's moments come first"
        x_BD, diff_BD = acts_BD.double(), acts_BD.double() - recon_BD.double()
        scale_D = self.data.std_D() + STANDARDIZE_EPS
        z_BD = (x_BD - self.data.mean_D) / scale_D
        spread_B = (z_BD - z_BD.mean(dim=1, keepdim=True)).pow(2).sum(dim=1)
        unexplained_B = (diff_BD / scale_D).pow(2).sum(dim=1) / spread_B
        self.error = self.error + diff_BD.pow(2).sum().cpu()
        self.explained_by_token = self.explained_by_token + (1 - unexplained_B).sum().cpu()
        self.tokens += len(acts_BD)

    def fvu(self) -> float:
        """Σ‖x − x̂‖² / Σ‖x − x̄‖²: the standard fraction of variance unexplained (NaN over no
        tokens)."""
        return float(self.error / self.data.total_variance().cpu()) if self.tokens else math.nan

    def clipscope_ev(self) -> float:
        """sache's explained variance (the module's docstring), as CLIP-Scope's card reports."""
        return float(self.explained_by_token / self.tokens) if self.tokens else math.nan
