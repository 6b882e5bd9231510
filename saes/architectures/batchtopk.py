"""BatchTopK (Bussmann et al., "BatchTopK Sparse Autoencoders", 2024): the B·k largest
pre-activations of a whole training batch, so a token may use more or fewer than k latents:

    training:   z = relu(batchtopk_{B·k}(pre / s))   pre = W_enc · (x − b_pre) + b_enc, ranked
                                                      over the batch
    inference:  z = pre · [pre / s > θ]               each vector alone

with each token's scale s (`batch_rank`):
- raw, s = 1: the paper's and SAELens' rule. Every pre-activation carries interference from the
  token's other features, growing with its norm, so raw ranking hands a big token many latents
  and starves the rest: on planted features it recovered 34% of the directions (TopK: 98%).
- relative, s = ‖x − b_pre‖: a token's pre-activations as shares of its size (95%).
- floor, s = the token's (2k)-th largest pre-activation, `FLOOR_RANK` · k: its interference
  floor, read where its own features have run out; unlike the norm it does not grow with the
  token's strongest features. `vitscope train`'s default: 99% of the directions, and held-out
  FVU 0.151 against TopK's 0.158 at the same L0, the BatchTopK paper's claim (BENCHMARKS.md,
  issue 23).

θ replaces the batch at inference (a JumpReLU; relative and floor: a threshold proportional to
the token's own s), so one image's codes do not depend on its neighbours. It is a running mean
of the smallest kept key pre / s of each training batch, θ ← θ + r · (min − θ) with
r = `threshold_rate` (0.2), as SAELens estimates it (its topk_threshold_lr, 0.01 there), except
that the first batch sets θ (SAELens starts from 0, which weighs 0.99^steps on that 0).

A varying number of latents per token, flat (kernels.Rows: B·k entries per batch);
`sae.train()` applies the batch rule (and updates θ), `sae.eval()` and `encode` the threshold,
as BatchNorm uses batch statistics in training and running ones at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch
from torch import Tensor

from vitscope.saes.card import Options, SAECard
from vitscope.saes.kernels import (
    KeepRule,
    Rows,
    SelectionPrecision,
    SparseEncode,
    kept_preacts,
    top_per_row,
)
from vitscope.saes.sae import SAE, SAELensLayout
from vitscope.support.configs import Above
from vitscope.support.errors import BadSetting

BatchRank = Literal["floor", "relative", "raw"]
FLOOR_RANK = 2
"""floor: s is each token's (FLOOR_RANK · k)-th largest pre-activation. At every dictionary
trained on planted features, floor keys at 2k kept sets at least as good as TopK's per-token
rule (bench/batch_rule_probe.py); a lower floor, at 4k, trained worse on planted features and
on SynthSAEBench (BENCHMARKS.md, issue 23)."""


@dataclass(frozen=True)
class BatchTopKOptions(Options):
    architecture: ClassVar[str] = "batchtopk"
    threshold_rate: Annotated[float, Above(0)] = 0.2
    """Weight of each training batch in θ's running mean. The smallest kept activation drifts
    down all through training, so θ lags it: after 256 steps, SAELens' rate 0.01 (its
    topk_threshold_lr) left inference L0 7-14% under k, 0.05 7%, 0.2 2% (bench/threshold_lag.py,
    BENCHMARKS.md)."""
    batch_rank: BatchRank = "raw"
    """What the batch rule ranks and θ thresholds: raw pre-activations (Bussmann et al., SAELens),
    or each divided by its token's s: relative, the centred norm ‖x − b_pre‖; floor, the token's
    (2k)-th largest pre-activation. Absent from a card: raw, what every SAE before format 1.3
    computes; `vitscope train` defaults to floor."""


SAMPLED_PREACTS = 2**16
"""Pre-activations the batch rule samples to guess its cut before the exact pass."""


def batch_topk_rule(k: int, scale_B: Tensor | None = None) -> KeepRule:
    """BatchTopK's training rule: the B·k largest positive keys pre / s of the whole batch, s the
    token's `scale_B` (None: 1, raw pre-activations).

    Found without sorting B·F values: a strided sample of the keys guesses a cut a little below
    the B·k-th largest, one pass keeps everything above it (lowered until at least B·k pass, or
    every positive value does), and the B·k largest are chosen among those.
    """

    def keep(product_BF: Tensor) -> Tensor:
        n_keep = k * len(product_BF)
        flat = product_BF.view(-1)
        stride = max(1, len(flat) // SAMPLED_PREACTS) | 1  # odd: not in step with a power-of-2 F
        sampled_S = torch.arange(0, len(flat), stride, device=flat.device)
        sample = keys(product_BF, sampled_S, scale_B).sort(descending=True).values
        expected = n_keep / stride
        rank = int(1.25 * expected + 3 * expected**0.5) + 1
        while True:
            guess = float(sample[rank]) if rank < len(sample) else 0.0
            passed_N = above(product_BF, max(guess, 0.0), scale_B, strictly=guess <= 0)
            if len(passed_N) >= n_keep or guess <= 0:
                break
            rank *= 2
        if len(passed_N) > n_keep:
            best = keys(product_BF, passed_N, scale_B).topk(n_keep, sorted=False).indices
            passed_N = passed_N[best].sort().values
        return passed_N

    return keep


def keys(product_BF: Tensor, flat_N: Tensor, scale_B: Tensor | None) -> Tensor:
    """The batch rule's keys at flat positions of the product: pre-activations, over their
    token's scale when there is one."""
    values_N = product_BF.view(-1).index_select(0, flat_N)
    if scale_B is None:
        return values_N
    return values_N / scale_B.index_select(0, flat_N // product_BF.shape[1])


def above(
    product_BF: Tensor, cut: Tensor | float, scale_B: Tensor | None, strictly: bool = True
) -> Tensor:
    """Flat positions (ascending) whose key pre / s is above `cut` (or at it, not `strictly`),
    compared as pre against cut · s: one pass over the product, no (B, F) division."""
    bound = cut if scale_B is None else cut * scale_B[:, None]
    mask_BF = product_BF > bound if strictly else product_BF >= bound
    return mask_BF.view(-1).nonzero().squeeze(1)


def threshold_rule(threshold: Tensor | float, scale_B: Tensor | None = None) -> KeepRule:
    """BatchTopK's inference rule (a JumpReLU): every key pre / s above the threshold."""
    return lambda product_BF: above(product_BF, threshold, scale_B)


class TokenScale:
    """Each token's s for the keys pre / s, by `batch_rank`: none (raw), its centred norm
    (relative), or its (FLOOR_RANK · k)-th largest pre-activation (floor), which the rule reads
    off the product when it sees it. Kept, so that θ's update divides the kept values by the
    same s."""

    def __init__(self, rank: BatchRank, k: int, x_centered: Tensor) -> None:
        self.rank, self.k, self.x_centered = rank, k, x_centered
        self.scale_B: Tensor | None = None

    def __call__(self, product_BF: Tensor) -> Tensor | None:
        if self.rank == "raw":
            return None
        if self.rank == "relative":
            return self.record(self.x_centered.detach().norm(dim=1))
        return self.record(floor_candidates(product_BF.detach(), self.k)[0].amin(dim=1))

    def record(self, scale_B: Tensor) -> Tensor:
        """Keep `scale_B`, made positive, as the tokens' s."""
        self.scale_B = scale_B.clamp_min(torch.finfo(scale_B.dtype).tiny)
        return self.scale_B


def floor_candidates(product_BF: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each token's FLOOR_RANK · k largest pre-activations and their latents, unsorted; the
    smallest of them is the token's floor."""
    return top_per_row(product_BF, min(FLOOR_RANK * k, product_BF.shape[1]))


def floor_batch_rule(k: int, scale: TokenScale) -> KeepRule:
    """The batch rule on floor keys, exactly, from each token's FLOOR_RANK · k largest
    pre-activations alone: those keys are all at least 1 and every other is at most 1 (its
    pre-activation is at most the floor), so the B·k largest keys are among them. One per-token
    top-(2k) pass, as TopK's per-token top k, replaces the pass over the whole product."""

    def keep(product_BF: Tensor) -> Tensor:
        n_tokens, width = product_BF.shape
        top_BM, idx_BM = floor_candidates(product_BF, k)
        floor_B = scale.record(top_BM.amin(dim=1))
        keys_N = torch.where(top_BM > 0, top_BM / floor_B[:, None], float("-inf")).view(-1)
        best_N = keys_N.topk(min(k * n_tokens, len(keys_N)), sorted=False).indices
        best_N = best_N[keys_N.index_select(0, best_N) > float("-inf")]  # positive only
        token_N = best_N // top_BM.shape[1]
        return (token_N * width + idx_BM.view(-1).index_select(0, best_N)).sort().values

    return keep


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
        """Inference's codes: the keys above θ (> 0, so their pre-activations are the
        activations)."""
        rule, _ = self._rule(x_centered)
        return kept_preacts(x_centered, self.w_enc, self.b_enc, rule, self.selection)

    def _select(self, x_centered: Tensor, dense: bool) -> tuple[Tensor, Rows]:
        rule, scale = self._rule(x_centered)
        z_N, rows = self._kept(x_centered, rule, dense)
        if self.training:
            scale_B = scale.scale_B
            keys_N = (
                z_N if scale_B is None else z_N / scale_B.index_select(0, rows.token_of_entry())
            )
            self._update_threshold(keys_N.detach())
        return z_N, rows

    def _rule(self, x_centered: Tensor) -> tuple[KeepRule, TokenScale]:
        """The batch's top B·k in training, θ at inference (as BatchNorm's two modes), on keys
        pre / s; and the tokens' s, once the rule has run."""
        scale = TokenScale(self.card.options.batch_rank, self.k, x_centered)

        def keep(product_BF: Tensor) -> Tensor:
            if not self.training:
                return threshold_rule(self.threshold, scale(product_BF))(product_BF)
            if scale.rank == "floor":
                return floor_batch_rule(self.k, scale)(product_BF)
            return batch_topk_rule(self.k, scale(product_BF))(product_BF)

        return keep, scale

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
    def _update_threshold(self, keys_N: Tensor) -> None:
        """θ's running mean of the smallest kept key; a batch that keeps none leaves θ."""
        positive = torch.where(keys_N > 0, keys_N, float("inf"))
        none = positive.new_full((1,), float("inf"))  # a batch may keep nothing
        smallest = torch.cat((positive, none)).min().to(self.threshold.dtype)
        moved = torch.where(
            self.threshold.isnan(),
            smallest,
            self.threshold.lerp(smallest, self.card.options.threshold_rate),
        )
        self.threshold.copy_(torch.where(smallest.isinf(), self.threshold, moved))

    def saelens_layout(self) -> SAELensLayout:
        """SAELens saves its BatchTopK SAEs as JumpReLU ones: θ in every latent's threshold. A
        threshold θ · s that moves with each token is no JumpReLU's, so it is refused."""
        rank = self.card.options.batch_rank
        if rank != "raw":
            raise BadSetting(
                f"{self.describe()} thresholds pre-activations relative to each token's own scale "
                f"(batch_rank {rank}), which SAELens' JumpReLU cannot compute; to export it, "
                "train with --batch-rank raw"
            )
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
