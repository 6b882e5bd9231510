"""BatchTopK and Matryoshka(-BatchTopK) SAEs: TopK's weights and recipe, other sparsity rules.

BatchTopK (Bussmann et al., "BatchTopK Sparse Autoencoders", 2024) keeps the B·k largest
pre-activations of a whole training batch, so a token may use more or fewer than k latents:

    training:   z = relu(batchtopk_{B·k}(W_enc · (x − b_pre) + b_enc))   ranked over the batch
    inference:  z = pre · [pre > θ]                                      each vector alone

θ replaces the batch at inference (a JumpReLU), so one image's codes do not depend on its
neighbours. It is a running mean of the smallest kept activation of each training batch,
θ ← θ + 0.2 · (min z⁺ − θ), as SAELens estimates it (its topk_threshold_lr, 0.01 there),
except that the first batch sets θ (SAELens starts from 0, which weighs 0.99^steps on that 0).

Matryoshka (Bussmann et al., "Learning Multi-Level Features with Matryoshka SAEs", 2025; as
SAELens' matryoshka_batchtopk): BatchTopK codes whose nested prefixes [0, m) of the dictionary
must each reconstruct too; the loss sums ‖x − (W_dec[:m]ᵀ z[:m] + b_pre)‖² over the inner
widths m on top of the full reconstruction's. With the codes' indices ascending, a band of
latents [m_i-1, m_i) is a slice of each token's entries: each band is decoded once by
SparseDecode and the prefixes are their running sums.

Both keep a varying number of latents per token, flat (kernels.Rows: B·k entries per batch);
`sae.train()` applies the batch rule (and updates θ), `sae.eval()` and `encode` the threshold,
as BatchNorm uses batch statistics in training and running ones at inference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from vitscope.train.card import Architecture
from vitscope.train.kernels import (
    KeepRule,
    Rows,
    SparseDecode,
    SparseEncode,
    batch_topk_rule,
    kept_preacts,
    threshold_rule,
)
from vitscope.train.sae import TopKSAE, dense_codes

THRESHOLD_RATE = 0.2
"""Weight of each training batch in θ's running mean. The smallest kept activation drifts down
all through training, so θ lags it: after 256 steps, SAELens' rate 0.01 (its topk_threshold_lr)
left inference L0 7-14% under k, 0.05 7%, 0.2 2% (bench/threshold_lag.py, BENCHMARKS.md)."""


class BatchTopKSAE(TopKSAE):
    """A BatchTopK SAE: the batch-wide top B·k in training, the threshold θ at inference."""

    running_buffers = ("threshold",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.card = dataclasses.replace(self.card, architecture="batchtopk")
        self.register_buffer("threshold", torch.full((), float("nan")))
        """θ, in the scaled units of the pre-activations; NaN (keeps nothing) until trained."""

    @torch.no_grad()
    def _encode_rows(self, x_centered: Tensor) -> tuple[Tensor, Rows]:
        """Inference's codes: the pre-activations above θ (> 0, so they are the activations)."""
        return kept_preacts(x_centered, self.w_enc, self.b_enc, self._rule(), self.selection)

    def _select(self, x_centered: Tensor, dense: bool) -> tuple[Tensor, Rows]:
        z_N, rows = self._kept(x_centered, self._rule(), dense)
        if self.training:
            self._update_threshold(z_N)
        return z_N, rows

    def _rule(self) -> KeepRule:
        """The batch's top B·k in training, θ at inference (as BatchNorm's two modes)."""
        return batch_topk_rule(self.k) if self.training else threshold_rule(self.threshold)

    def _kept(self, x_centered: Tensor, keep: KeepRule, dense: bool) -> tuple[Tensor, Rows]:
        """relu of the kept pre-activations, flat (B·k entries in all for the batch rule)."""
        if dense:
            preacts_BF = x_centered @ self.w_enc.T + self.b_enc
            kept_N = keep(preacts_BF.detach())
            rows = Rows.from_flat(kept_N, *preacts_BF.shape)
            return preacts_BF.relu().view(-1)[kept_N], rows
        preacts_N, rows = kept_preacts(
            x_centered.detach(), self.w_enc, self.b_enc, keep, self.selection
        )
        z_N = SparseEncode.apply(x_centered, self.w_enc, self.b_enc, preacts_N, rows, True)
        return z_N, rows

    @torch.no_grad()
    def _update_threshold(self, z_N: Tensor) -> None:
        """θ's running mean of the smallest kept activation (no host sync: GPU steps stay async)."""
        positive = torch.where(z_N > 0, z_N, float("inf"))
        none = positive.new_full((1,), float("inf"))  # a batch may keep nothing
        smallest = torch.cat((positive, none)).min().to(self.threshold.dtype)
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

    def _reconstructions(self, z_N: Tensor, rows: Rows, dense: bool) -> list[Tensor]:
        """Each prefix's reconstruction, the full one last: the sum of the bands [m_i-1, m_i)
        up to it, each entry decoded once (its latents are ascending, so a band is a slice of
        every token's entries)."""
        if dense:
            z_BF = dense_codes(z_N, rows, self.n_latents)
            return [z_BF[:, :m] @ self.w_dec[:m] for m in self.widths]
        recons: list[Tensor] = []
        for low, high in zip((0, *self.widths[:-1]), self.widths, strict=True):
            band_N = (rows.idx >= low) & (rows.idx < high)
            part = SparseDecode.apply(z_N[band_N], rows.subset(band_N), self.w_dec)
            recons.append(recons[-1] + part if recons else part)
        return recons


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
