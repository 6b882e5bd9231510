"""TopK (Gao et al., 2024): each vector keeps its k largest pre-activations.

    z = act(topk_k(W_enc · (x − b_pre) + b_enc))   act: relu, or none for CLIP-Scope's SAEs

The same rule in training and at inference, so `encode` is training's selection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from vitscope.saes.card import Activation, Options
from vitscope.saes.kernels import Rows, SparseEncode, topk_preacts
from vitscope.saes.sae import SAE, SAELensLayout


@dataclass(frozen=True)
class TopKOptions(Options):
    architecture: ClassVar[str] = "topk"
    activation: Activation = "relu"
    """Applied to the k kept values: relu (Gao et al.) or none (CLIP-Scope keeps raw values)."""


class TopKSAE(SAE):
    """A TopK SAE: the k largest pre-activations of each vector, then the activation."""

    Options = TopKOptions

    @property
    def activation(self) -> Activation:  # type: ignore[override]
        return self.card.options.activation

    def _select(self, x_centered: Tensor, dense: bool) -> tuple[Tensor, Rows]:
        """The K kept latents of each token after the activation, indices ascending."""
        relu = self.activation == "relu"
        if dense:
            preacts_BF = x_centered @ self.w_enc.T + self.b_enc
            values, idx = preacts_BF.topk(self.k, dim=1)
            idx, order = idx.sort(dim=1)
            values = values.gather(1, order).flatten()
            return (values.relu() if relu else values), Rows.uniform(idx)
        preacts_BK, idx_BK = topk_preacts(
            x_centered.detach(), self.w_enc, self.b_enc, self.k, self.selection
        )
        rows = Rows.uniform(idx_BK)
        z_N = SparseEncode.apply(
            x_centered, self.w_enc, self.b_enc, preacts_BK.flatten(), rows, relu, self.kernels
        )
        return z_N, rows

    def saelens_layout(self) -> SAELensLayout:
        """SAELens' TopK SAE: z = relu(topk(pre)), the same function (ReLU SAEs only)."""
        return SAELensLayout({"architecture": "topk", "k": self.k})
