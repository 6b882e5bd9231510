"""BatchTopK and Matryoshka(-BatchTopK) SAEs: TopK's weights and recipe, other sparsity rules.

BatchTopK (Bussmann et al., "BatchTopK Sparse Autoencoders", 2024) keeps the B·k largest
pre-activations of a whole training batch, so a token may use more or fewer than k latents:

    training:   z = relu(batchtopk_{B·k}(W_enc · (x − b_pre) + b_enc))   ranked over the batch
    inference:  z = pre · [pre > θ]                                      each vector alone

θ replaces the batch at inference (a JumpReLU), so one image's codes do not depend on its
neighbours. It is a running mean of the smallest kept activation of each training batch,
θ ← θ + 0.01 · (min z⁺ − θ), as SAELens estimates it (its topk_threshold_lr), except that the
first batch sets θ (SAELens starts from 0, which weighs 0.99^steps of the estimate on 0).

Matryoshka (Bussmann et al., "Learning Multi-Level Features with Matryoshka SAEs", 2025; as
SAELens' matryoshka_batchtopk): BatchTopK codes whose nested prefixes [0, m) of the dictionary
must each reconstruct too; the loss sums ‖x − (W_dec[:m]ᵀ z[:m] + b_pre)‖² over the inner
widths m on top of the full reconstruction's. With the codes' indices ascending, a prefix is a
mask on the values, so every reconstruction reuses SparseDecode.

Both keep a varying number of latents per token, in the padded layout of kernels.kept_preacts;
`sae.train()` applies the batch rule (and updates θ), `sae.eval()` and `encode` the threshold,
as BatchNorm uses batch statistics in training and running ones at inference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from vitscope.saes.card import Architecture
from vitscope.saes.kernels import (
    KeepRule,
    SparseDecode,
    SparseEncode,
    batch_topk_rule,
    kept_preacts,
    threshold_rule,
)
from vitscope.saes.sae import SAEOutput, TopKSAE

THRESHOLD_RATE = 0.01
"""Weight of each training batch in θ's running mean (SAELens' topk_threshold_lr)."""

CANDIDATES_PER_K = 4
"""Candidates each token offers the batch rule, times k (doubled when a token keeps them all)."""


class BatchTopKSAE(TopKSAE):
    """A BatchTopK SAE: the batch-wide top B·k in training, the threshold θ at inference."""

    running_buffers = ("threshold",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.card = dataclasses.replace(self.card, architecture="batchtopk")
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
        z_BK = SparseEncode.apply(x_centered, self.w_enc, self.b_enc, preacts_BK, idx_BK, True)
        return z_BK, idx_BK

    @torch.no_grad()
    def _update_threshold(self, z_BK: Tensor) -> None:
        """θ's running mean of the smallest kept activation (no host sync: GPU steps stay async)."""
        smallest = torch.where(z_BK > 0, z_BK, float("inf")).min().to(self.threshold.dtype)
        moved = torch.where(
            self.threshold.isnan(), smallest, self.threshold.lerp(smallest, THRESHOLD_RATE)
        )
        self.threshold.copy_(torch.where(smallest.isinf(), self.threshold, moved))


class MatryoshkaSAE(BatchTopKSAE):
    """A Matryoshka-BatchTopK SAE: each inner prefix of the dictionary reconstructs too."""

    def __init__(self, *args: Any, widths: tuple[int, ...], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.card = dataclasses.replace(
            self.card, architecture="matryoshka", matryoshka_widths=tuple(widths)
        )
        self.widths = self.card.matryoshka_widths

    def autoencode(
        self, x_BD: Tensor, dead_F: Tensor | None = None, dense: bool = False
    ) -> SAEOutput:
        out = super().autoencode(x_BD, dead_F, dense)
        inner = self.widths[:-1]
        if dense:
            z_BF = x_BD.new_zeros(len(x_BD), self.n_latents).scatter(1, out.idx_BK, out.z_BK)
            recons = [z_BF[:, :m] @ self.w_dec[:m] for m in inner]
        else:
            recons = [
                SparseDecode.apply(out.z_BK * (out.idx_BK < m), out.idx_BK, self.w_dec)
                for m in inner
            ]
        return dataclasses.replace(out, prefix_recons=tuple(r + self.b_pre for r in recons))


def build_sae(
    architecture: Architecture,
    d_in: int,
    n_latents: int,
    k: int,
    k_aux: int = 0,
    matryoshka_widths: tuple[int, ...] = (),
    **options: Any,
) -> TopKSAE:
    """A fresh SAE of `architecture`; `options` are TopKSAE's (seed, activation, selection)."""
    if architecture == "matryoshka":
        return MatryoshkaSAE(d_in, n_latents, k, k_aux, widths=matryoshka_widths, **options)
    sae_class = BatchTopKSAE if architecture == "batchtopk" else TopKSAE
    return sae_class(d_in, n_latents, k, k_aux, **options)
