"""BatchTopK (Bussmann et al., "BatchTopK Sparse Autoencoders", 2024): the B·k largest
pre-activations of a whole training batch, so a token may use more or fewer than k latents:

    training:   z = relu(batchtopk_{B·k}(W_enc · (x − b_pre) + b_enc))   ranked over the batch
    inference:  z = pre · [pre > θ]                                      each vector alone

θ replaces the batch at inference (a JumpReLU), so one image's codes do not depend on its
neighbours. It is a running mean of the smallest kept activation of each training batch,
θ ← θ + r · (min z⁺ − θ) with r = `threshold_rate` (0.2), as SAELens estimates it (its
topk_threshold_lr, 0.01 there), except that the first batch sets θ (SAELens starts from 0, which
weighs 0.99^steps on that 0).

A varying number of latents per token, flat (kernels.Rows: B·k entries per batch);
`sae.train()` applies the batch rule (and updates θ), `sae.eval()` and `encode` the threshold,
as BatchNorm uses batch statistics in training and running ones at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor

from vitscope.saes.card import Options, SAECard
from vitscope.saes.kernels import (
    KeepRule,
    Rows,
    SelectionPrecision,
    SparseEncode,
    kept_preacts,
)
from vitscope.saes.sae import SAE, SAELensLayout
from vitscope.support.configs import Above


@dataclass(frozen=True)
class BatchTopKOptions(Options):
    architecture: ClassVar[str] = "batchtopk"
    threshold_rate: Annotated[float, Above(0)] = 0.2
    """Weight of each training batch in θ's running mean. The smallest kept activation drifts
    down all through training, so θ lags it: after 256 steps, SAELens' rate 0.01 (its
    topk_threshold_lr) left inference L0 7-14% under k, 0.05 7%, 0.2 2% (bench/threshold_lag.py,
    BENCHMARKS.md)."""


SAMPLED_PREACTS = 2**16
"""Pre-activations the batch rule samples to guess its cut before the exact pass."""


def batch_topk_rule(k: int) -> KeepRule:
    """BatchTopK's training rule: the B·k largest positive pre-activations of the whole batch.

    Found without sorting B·F values: a strided sample of the product guesses a cut a little
    below the B·k-th largest, one pass keeps everything above it (lowered until at least B·k
    pass, or every positive value does), and the B·k largest are chosen among those.
    """

    def keep(product_BF: Tensor) -> Tensor:
        n_keep = k * len(product_BF)
        flat = product_BF.view(-1)
        stride = max(1, len(flat) // SAMPLED_PREACTS) | 1  # odd: not in step with a power-of-2 F
        sample = flat[::stride].sort(descending=True).values
        expected = n_keep / stride
        rank = int(1.25 * expected + 3 * expected**0.5) + 1
        while True:
            guess = float(sample[rank]) if rank < len(sample) else 0.0
            passed_N = (flat > 0).nonzero() if guess <= 0 else (flat >= guess).nonzero()
            if len(passed_N) >= n_keep or guess <= 0:
                break
            rank *= 2
        passed_N = passed_N.squeeze(1)
        if len(passed_N) > n_keep:
            best = flat[passed_N].topk(n_keep, sorted=False).indices
            passed_N = passed_N[best].sort().values
        return passed_N

    return keep


def threshold_rule(threshold: Tensor | float) -> KeepRule:
    """BatchTopK's inference rule (a JumpReLU): every pre-activation above the threshold."""
    return lambda product_BF: (product_BF.view(-1) > threshold).nonzero().squeeze(1)


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
        z_N = SparseEncode.apply(
            x_centered, self.w_enc, self.b_enc, preacts_N, rows, True, self.kernels
        )
        return z_N, rows

    @torch.no_grad()
    def _update_threshold(self, z_N: Tensor) -> None:
        """θ's running mean of the smallest kept activation; a batch that keeps none leaves θ."""
        positive = torch.where(z_N > 0, z_N, float("inf"))
        none = positive.new_full((1,), float("inf"))  # a batch may keep nothing
        smallest = torch.cat((positive, none)).min().to(self.threshold.dtype)
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
