"""What every SAE here shares, whatever keeps its latents (Gao et al., "Scaling and evaluating
sparse autoencoders", 2024, for TopK):

    x = s · a                                    (a: the activations, s: the input scale)
    z = act(keep(W_enc · (x − b_pre) + b_enc))   (keep: the architecture's rule; act: relu or none)
    x̂ = W_decᵀ · z + b_pre,   â = x̂ / s

`input_scale` s is fixed at initialisation so that E‖x − x̄‖² = 1 on the training data and
stored with the SAE. Users call `encode(a)`, `decode(codes)` and `sae(a)`, all in the
activations' own units; training calls `autoencode(x)` on scaled inputs. Shapes: B tokens,
D = d_in, F = n_latents, K = k. W_enc and W_dec are both (F, D): row f of W_dec is latent f's
direction (unit norm at the start; kept so with `unit_decoder`); W_enc starts as W_dec (the
trainer then scales it, `encoder_init_scale`). The sparse path (saes/kernels.py) and the dense
path compute the same function and the same gradients. Each architecture (saes/architectures/)
subclasses `SAE` with its options, its keep rule and, where it has them, extra loss terms.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional

from vitscope.saes.aux import aux_recon
from vitscope.saes.card import Activation, InputNorm, Options, SAECard
from vitscope.saes.kernels import (
    Kernels,
    Rows,
    SelectionPrecision,
    SparseDecode,
    padded,
)
from vitscope.support.errors import BadSetting

STANDARDIZE_EPS = 1e-6
"""CLIP-Scope's epsilon in (x − mean) / (std + eps)."""

ENCODE_ROWS = 4096
"""Rows per selection product in `encode` (bounds inference memory, whatever the batch)."""

AUX_COEFFICIENT = 1 / 32
"""Weight of the AuxK loss (Gao et al., section 2.4)."""


@dataclass
class SparseCodes:
    """Which latents each input vector uses, and how strongly: shapes (..., K), one row per
    vector of the input's leading shape; indices ascending within a row. K = k for TopK SAEs;
    BatchTopK and Matryoshka SAEs keep a varying number per vector, so K is the most any vector
    of the call keeps and the other rows are padded with zero values (`dense()` is exact)."""

    indices: Tensor
    values: Tensor
    n_latents: int
    standardized_by: tuple[Tensor, Tensor] | None = None
    """(mean_D, std_D) of the batch when the SAE standardises its inputs; decode undoes them."""

    def dense(self) -> Tensor:
        """The (..., F) latent activations, zero where inactive."""
        out = self.values.new_zeros(*self.values.shape[:-1], self.n_latents)
        return out.scatter(-1, self.indices, self.values)

    def by_value(self) -> SparseCodes:
        """The same codes with each row ordered by value, largest first."""
        values, order = self.values.sort(dim=-1, descending=True)
        indices = self.indices.gather(-1, order)
        return SparseCodes(indices, values, self.n_latents, self.standardized_by)


@dataclass
class SAEOutput:
    recon_BD: Tensor
    z_N: Tensor
    """Activations of the kept entries (after ReLU), flat in `rows`' order."""
    rows: Rows
    """Which latents each token kept (CSR: k per token for TopK, varying for the batch rules)."""
    aux_recon_BD: Tensor | None
    """AuxK's reconstruction of the residual from dead latents (None when none are dead)."""
    prefix_recons: tuple[Tensor, ...] = ()
    """Inner reconstructions an architecture adds (Matryoshka's prefixes), for its own losses."""

    def l0_B(self) -> Tensor:
        """Active (nonzero: after a ReLU, positive) latents of each token."""
        active = (self.z_N != 0).to(torch.long)
        counts = torch.zeros(self.rows.n_tokens, dtype=torch.long, device=active.device)
        return counts.index_add_(0, self.rows.token_of_entry(), active)

    def fired_latents(self) -> Tensor:
        """The latents active for some token of the batch (with repeats)."""
        return self.rows.idx[self.z_N != 0]


def dense_codes(z_N: Tensor, rows: Rows, n_latents: int) -> Tensor:
    """(B, F) codes from flat ones, zero where not kept; differentiable in z_N."""
    out = z_N.new_zeros(rows.n_tokens, n_latents)
    return out.index_put((rows.token_of_entry(), rows.idx), z_N)


@dataclass
class SAELensLayout:
    """How an architecture appears in SAELens (saes/saelens.py writes the shared rest)."""

    cfg: dict[str, Any]
    """SAELens' architecture and its own cfg.json keys, e.g. {"architecture": "topk", "k": 32}."""
    tensors: dict[str, Tensor] = field(default_factory=dict)
    """Weights beyond W_enc, b_enc, W_dec and b_dec, e.g. a JumpReLU's threshold."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Keys of cfg.json's metadata, e.g. the training architecture."""


class SAE(nn.Module):
    """An SAE built from its card (`build_sae(card)`), with its input scale: the weights, encode
    and decode, AuxK and the recipe's rules. An architecture subclasses it (saes/architectures/)
    with its `Options`, its keep rule (`_select`) and its SAELens layout."""

    Options: ClassVar[type[Options]]
    """The architecture's card fields; `card.options` is one."""
    running_buffers: tuple[str, ...] = ()
    """Buffers that training steps update (not through gradients): data-parallel ranks average
    them after every step."""
    activation: Activation = "relu"
    """Applied to the kept pre-activations."""

    def __init__(
        self, card: SAECard, seed: int = 0, selection: SelectionPrecision = "float32"
    ) -> None:
        super().__init__()
        self.card = card
        self.d_in, self.n_latents, self.k = card.d_in, card.n_latents, card.options.k
        self.selection: SelectionPrecision = selection
        """The product that picks each token's kept latents in training (kernels.topk_preacts);
        the kept values are float32 either way."""
        self.input_norm: InputNorm = card.input_norm
        self.kernels = Kernels()
        """Which implementation of each sparse product to run (kernels.Kernels); by device."""
        generator = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(self.n_latents, self.d_in, generator=generator)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.w_dec = nn.Parameter(w_dec)
        self.w_enc = nn.Parameter(w_dec.clone())
        self.b_enc = nn.Parameter(torch.zeros(self.n_latents))
        self.b_pre = nn.Parameter(torch.zeros(self.d_in))
        self.register_buffer("input_scale", torch.full((), card.input_scale))

    # ------------------------------------------------------- in the activations' units
    def encode(self, acts: Tensor) -> SparseCodes:
        """Sparse codes of activations of shape (..., d_in), on the SAE's device."""
        x_BD = self._as_rows(acts)
        stats = None
        if self.input_norm == "standardize":
            x_BD, stats = standardize(x_BD)
        else:
            x_BD = x_BD * self.input_scale
        # Rows a few thousand at a time: the selection's (rows x latents) product is 1 GB per
        # 4,096 rows at 65,536 latents, so a hundred ViT-L images at once would need 7 GB.
        blocks = [self._encode_rows(rows) for rows in (x_BD - self.b_pre).split(ENCODE_ROWS)]
        z_BK, idx_BK = padded(torch.cat([z for z, _ in blocks]), Rows.cat([r for _, r in blocks]))
        shape = (*acts.shape[:-1], idx_BK.shape[1])
        values = z_BK.view(shape).to(acts.dtype)
        return SparseCodes(idx_BK.view(shape), values, self.n_latents, stats)

    def decode(self, codes: SparseCodes) -> Tensor:
        """Reconstructed activations (..., d_in) from codes, in the codes' dtype."""
        lead = codes.indices.shape[:-1]
        idx_BK = codes.indices.reshape(-1, codes.indices.shape[-1])
        z_BK = codes.values.reshape(idx_BK.shape).to(self.w_dec.dtype)
        rows = Rows.uniform(idx_BK)
        recon = SparseDecode.apply(z_BK.flatten(), rows, self.w_dec, self.kernels) + self.b_pre
        recon = self._unscaled(recon, codes.standardized_by)
        return recon.view(*lead, self.d_in).to(codes.values.dtype)

    def forward(self, acts: Tensor) -> Tensor:
        """The reconstruction of activations (..., d_in), same shape and dtype."""
        return self.decode(self.encode(acts))

    def set_input_norm(self, input_norm: InputNorm) -> None:
        """How `encode` normalises: "scale" (x · input_scale) or "standardize" (per batch)."""
        self.input_norm = input_norm
        self.card = dataclasses.replace(self.card, input_norm=input_norm)

    def _as_rows(self, acts: Tensor) -> Tensor:
        """(N, D) inputs in the SAE's dtype and device; a wrong width is a one-line error."""
        if acts.shape[-1:] != (self.d_in,):
            raise BadSetting(
                f"expected activations of shape (..., {self.d_in}) for {self.describe()}, "
                f"got {tuple(acts.shape)}; pass the residual stream the SAE was trained on"
            )
        return acts.reshape(-1, self.d_in).to(device=self.w_enc.device, dtype=self.w_enc.dtype)

    def describe(self) -> str:
        """The SAE in a few words, for messages: its shape and what it reads."""
        card = self.card
        reads = f", {card.model} layer {card.layer}" if card.model else ""
        return f"the {card.source} SAE (d_in {self.d_in}, {self.n_latents} latents{reads})"

    # ------------------------------------------------------ in scaled units (training)
    def training_inputs(self, acts_BD: Tensor) -> Tensor:
        """The inputs `autoencode` works on: activations times the input scale, or each batch
        standardised per feature when the SAE was trained that way."""
        if self.input_norm == "standardize":
            return standardize(acts_BD)[0]
        return acts_BD * self.input_scale

    def activation_units(self, recon_BD: Tensor, acts_BD: Tensor) -> Tensor:
        """`autoencode(training_inputs(acts_BD))`'s reconstruction back in the activations' units
        (what `decode` gives), so a metric means the same whatever the SAE's input norm."""
        stats = standardize(acts_BD)[1] if self.input_norm == "standardize" else None
        return self._unscaled(recon_BD, stats)

    def _unscaled(self, recon_BD: Tensor, stats: tuple[Tensor, Tensor] | None) -> Tensor:
        """Undo the input norm: the batch's standardisation (`stats`: mean_D, std_D) or the
        input scale."""
        if stats is not None:
            mean_D, std_D = stats
            return recon_BD * (std_D + STANDARDIZE_EPS) + mean_D
        return recon_BD / self.input_scale

    def autoencode(
        self, x_BD: Tensor, dead_F: Tensor | None = None, k_aux: int = 0, dense: bool = False
    ) -> SAEOutput:
        """Encode, decode, and (when latents are dead) AuxK's reconstruction of the residual from
        the `k_aux` best dead latents (a training setting: the trainer passes its config's)."""
        x_centered = x_BD - self.b_pre
        z_N, rows = self._select(x_centered, dense)
        *inner, recon = (r + self.b_pre for r in self._reconstructions(z_N, rows, dense))
        aux = None
        if dead_F is not None and bool(dead_F.any()):
            aux = self._aux_recon(x_centered.detach(), dead_F, k_aux, dense)
        return SAEOutput(recon, z_N, rows, aux, tuple(inner))

    def _reconstructions(self, z_N: Tensor, rows: Rows, dense: bool) -> list[Tensor]:
        """What the loss compares with the input, without b_pre: the reconstruction, after any
        inner ones an architecture adds (Matryoshka's prefixes)."""
        if dense:
            return [dense_codes(z_N, rows, self.n_latents) @ self.w_dec]
        return [SparseDecode.apply(z_N, rows, self.w_dec, self.kernels)]

    @torch.no_grad()
    def _encode_rows(self, x_centered: Tensor) -> tuple[Tensor, Rows]:
        """Inference's flat codes of (B, D) centred inputs: by default training's selection."""
        return self._select(x_centered, dense=False)

    def _select(self, x_centered: Tensor, dense: bool) -> tuple[Tensor, Rows]:
        """The architecture's keep rule in training: the kept entries after the activation, flat
        (values_N, Rows), latents ascending per token."""
        raise NotImplementedError(f"{type(self).__name__} has no keep rule")

    def extra_losses(self, out: SAEOutput, x_BD: Tensor) -> dict[str, Tensor]:
        """Loss terms of the architecture's own, added to the total by `losses` (none here)."""
        return {}

    def saelens_layout(self) -> SAELensLayout:
        """The architecture in SAELens' terms, for saes/saelens.py."""
        raise NotImplementedError(f"{type(self).__name__} has no SAELens layout")

    def _aux_recon(self, x_centered: Tensor, dead_F: Tensor, k_aux: int, dense: bool) -> Tensor:
        """AuxK's reconstruction from the top k_aux dead latents (saes/aux.py); `dense` is the
        reference formula over all F latents that tests hold the implementations to."""
        if not dense:
            return aux_recon(
                x_centered, self.w_enc, self.b_enc, self.w_dec, dead_F, k_aux, self.kernels
            )
        preacts_BF = x_centered @ self.w_enc.T + self.b_enc
        masked = preacts_BF.masked_fill(~dead_F, float("-inf"))
        values, idx = masked.topk(min(k_aux, int(dead_F.sum())), dim=1)
        z_BF = torch.zeros_like(preacts_BF).scatter(1, idx, values)
        return z_BF @ self.w_dec

    # ------------------------------------------------------------ the recipe's rules
    @torch.no_grad()
    def initialise_from(self, sample_ND: Tensor) -> None:
        """Input scale to unit mean squared distance from the sample's mean (1 when
        standardising); b_pre at the geometric median of the sample's training inputs.

        The distance, not the norm: b_pre removes the mean anyway, and scaling by the norm let a
        large mean offset shrink the signal the SAE sees, and with it every activation, under
        the same Adam steps (planted features with an offset 8x the signal: held-out FVU 0.66
        against 0.16; BENCHMARKS.md, issue 23)."""
        if self.input_norm == "scale":
            centred_ND = sample_ND - sample_ND.mean(dim=0)
            self.input_scale.fill_(float(centred_ND.pow(2).sum(dim=1).mean().rsqrt()))
        self.b_pre.copy_(geometric_median(self.training_inputs(sample_ND)))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Keep only the part of each decoder row's gradient that is orthogonal to the row."""
        if self.w_dec.grad is not None:
            parallel = (self.w_dec.grad * self.w_dec).sum(dim=1, keepdim=True)
            self.w_dec.grad.sub_(parallel * self.w_dec)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.w_dec.div_(self.w_dec.norm(dim=1, keepdim=True))


def standardize(x_BD: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """CLIP-Scope's training inputs: each feature to zero mean and unit (unbiased) standard
    deviation over the batch's vectors, (x − mean) / (std + 1e-6)."""
    if len(x_BD) < 2:
        raise BadSetting(
            "input_norm 'standardize' needs a batch of at least 2 vectors (it standardises each "
            "feature over the batch); pass more tokens, or load with input_norm='scale'"
        )
    mean_D, std_D = x_BD.mean(dim=0), x_BD.std(dim=0)
    return (x_BD - mean_D) / (std_D + STANDARDIZE_EPS), (mean_D, std_D)


def losses(
    sae: SAE, out: SAEOutput, x_BD: Tensor, aux_coefficient: float = AUX_COEFFICIENT
) -> dict[str, Tensor]:
    """Reconstruction MSE (sum over D, mean over B), normalised AuxK loss, the architecture's
    own terms (`sae.extra_losses`, e.g. Matryoshka's prefix MSE), and their total."""
    mse = squared_error(out.recon_BD, x_BD)
    extra = sae.extra_losses(out, x_BD)
    aux = torch.zeros((), device=x_BD.device)
    if out.aux_recon_BD is not None:
        residual = (x_BD - out.recon_BD).detach()
        spread = residual.square().sum() / len(residual)
        aux = squared_error(out.aux_recon_BD, residual) / spread.clamp_min(1e-12)
    total = mse
    for term in extra.values():
        total = total + term
    total = total + aux_coefficient * aux
    return {"mse": mse, **extra, "aux": aux, "loss": total}


def squared_error(a_BD: Tensor, b_BD: Tensor) -> Tensor:
    """‖a − b‖² summed over D, averaged over B, as one fused kernel each way (`mse_loss`): the
    chain (a − b).pow(2).sum(dim=1).mean() makes four (B, D) temporaries, and Matryoshka pays
    one such loss per prefix."""
    return functional.mse_loss(a_BD, b_BD, reduction="sum") / len(a_BD)


@torch.no_grad()
def geometric_median(points_ND: Tensor, iterations: int = 50, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances."""
    median = points_ND.mean(dim=0)
    for _ in range(iterations):
        weights = 1 / (points_ND - median).norm(dim=1).clamp_min(1e-8)
        updated = (weights[:, None] * points_ND).sum(dim=0) / weights.sum()
        if (updated - median).norm() <= tol * median.norm().clamp_min(1e-12):
            return updated
        median = updated
    return median
