"""BatchTopK (Bussmann et al., "BatchTopK Sparse Autoencoders", 2024): the B·k largest
pre-activations of a whole training batch, so a token may use more or fewer than k latents:

    training:   z = relu(batchtopk_{B·k}(W_enc · (x − b_pre) + b_enc))   ranked over the batch
    inference:  z = pre · [pre > θ]                                      each vector alone

θ replaces the batch at inference (a JumpReLU), so one image's codes do not depend on its
neighbours. It is a running mean of the smallest kept activation of each training batch,
θ ← θ + r · (min z⁺ − θ) with r = `threshold_rate` (0.01), as SAELens estimates it (its
topk_threshold_lr), except that the first batch sets θ (SAELens starts from 0, which weighs
0.99^steps of the estimate on 0).

A varying number of latents per token, in the padded layout of kernels.kept_preacts;
`sae.train()` applies the batch rule (and updates θ), `sae.eval()` and `encode` the threshold,
as BatchNorm uses batch statistics in training and running ones at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor

from vitscope.saes.card import Options, SAECard
from vitscope.saes.kernels import KeepRule, SelectionPrecision, SparseEncode, kept_preacts
from vitscope.saes.sae import SAE, SAELensLayout
from vitscope.support.configs import Above

CANDIDATES_PER_K = 4
"""Candidates each token offers the batch rule, times k (doubled when a token keeps them all)."""


@dataclass(frozen=True)
class BatchTopKOptions(Options):
    architecture: ClassVar[str] = "batchtopk"
    threshold_rate: Annotated[float, Above(0)] = 0.01
    """Weight of each training batch in θ's running mean (SAELens' topk_threshold_lr)."""


def batch_topk_rule(k: int) -> KeepRule:
    """BatchTopK's training rule: the B·k largest positive pre-activations of the whole batch."""

    def keep(values_BC: Tensor) -> Tensor:
        flat = values_BC.flatten()
        kept = torch.zeros_like(flat, dtype=torch.bool)
        kept[flat.topk(min(k * len(values_BC), len(flat))).indices] = True
        return kept.view(values_BC.shape) & (values_BC > 0)

    return keep


def threshold_rule(threshold: Tensor | float) -> KeepRule:
    """BatchTopK's inference rule (a JumpReLU): every pre-activation above the threshold."""
    return lambda values_BC: values_BC > threshold


class BatchTopKSAE(SAE):
    """A BatchTopK SAE: the batch-wide top B·k in training, the threshold θ at inference."""

    Options = BatchTopKOptions
    running_buffers = ("threshold",)
    saelens_training_architecture = "batchtopk"
    """SAELens' name of this training architecture (it saves the SAE as a JumpReLU one)."""

    def __init__(
        self, card: SAECard, seed: int = 0, selection: SelectionPrecision = "float32"
    ) -> None:
        super().__init__(card, seed, selection)
        self.register_buffer("threshold", torch.full((), float("nan")))
        """θ, in the scaled units of the pre-activations; NaN (keeps nothing) until trained."""

    def _encode_rows(self, x_centered: Tensor) -> tuple[Tensor, Tensor]:
        return self._kept(x_centered, threshold_rule(self.threshold), dense=False)

    def _select(self, x_centered: Tensor, dense: bool) -> tuple[Tensor, Tensor]:
        if not self.training:
            return self._kept(x_centered, threshold_rule(self.threshold), dense)
        z_BK, idx_BK = self._kept(x_centered, batch_topk_rule(self.k), dense)
        self._update_threshold(z_BK)
        return z_BK, idx_BK

    def _kept(self, x_centered: Tensor, keep: KeepRule, dense: bool) -> tuple[Tensor, Tensor]:
        """relu of the kept pre-activations in the padded (B, K') layout, indices ascending."""
        if dense:
            preacts_BF = x_centered @ self.w_enc.T + self.b_enc
            kept_BF = keep(preacts_BF.detach())
            z_BF = preacts_BF.relu() * kept_BF
            most = max(int(kept_BF.sum(dim=1).max()), 1)
            idx = kept_BF.float().topk(most, dim=1).indices.sort(dim=1).values
            return z_BF.gather(1, idx), idx
        candidates = CANDIDATES_PER_K * self.k
        preacts_BK, idx_BK = kept_preacts(
            x_centered.detach(), self.w_enc, self.b_enc, keep, self.selection, candidates
        )
        z_BK = SparseEncode.apply(
            x_centered, self.w_enc, self.b_enc, preacts_BK, idx_BK, True, self.kernels
        )
        return z_BK, idx_BK

    @torch.no_grad()
    def _update_threshold(self, z_BK: Tensor) -> None:
        """θ's running mean of the smallest kept activation (no host sync: GPU steps stay async)."""
        smallest = torch.where(z_BK > 0, z_BK, float("inf")).min().to(self.threshold.dtype)
        moved = torch.where(
            self.threshold.isnan(),
            smallest,
            self.threshold.lerp(smallest, self.card.options.threshold_rate),
        )
        self.threshold.copy_(torch.where(smallest.isinf(), self.threshold, moved))

    def saelens_layout(self) -> SAELensLayout:
        """SAELens saves its BatchTopK SAEs as JumpReLU ones: θ in every latent's threshold."""
        return SAELensLayout(
            {"architecture": "jumprelu"},
            {"threshold": self.get_buffer("threshold").float().cpu().repeat(self.n_latents)},
            {
                "training_architecture": self.saelens_training_architecture,
                "training_architecture_details": self._saelens_details(),
            },
        )

    def _saelens_details(self) -> dict[str, Any]:
        return {"k": self.k, "topk_threshold_lr": self.card.options.threshold_rate}
