"""The TopK sparse autoencoder of Gao et al., "Scaling and evaluating sparse autoencoders" (2024).

    x̂ = W_decᵀ · relu(topk(W_enc · (x − b_pre) + b_enc)) + b_pre

x is the activation times one fixed `input_scale` (so E‖x‖² = 1 on the training data), stored
with the SAE. Shapes: B tokens, D = d_in, F = n_latents, K = k. W_enc and W_dec are both (F, D):
row f of W_dec is latent f's unit-norm direction; W_enc starts as W_dec. The sparse path
(train/kernels.py) and the dense path compute the same function and the same gradients.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vitscope.train.kernels import SparseDecode, SparseEncode, topk_preacts

AUX_COEFFICIENT = 1 / 32
"""Weight of the AuxK loss (Gao et al., section 2.4)."""


@dataclass
class SAEOutput:
    recon_BD: Tensor
    z_BK: Tensor
    """Activations of the K selected latents (after ReLU), one row per token."""
    idx_BK: Tensor
    """Their latent indices, ascending per token."""
    aux_recon_BD: Tensor | None
    """AuxK's reconstruction of the residual from dead latents (None when none are dead)."""


class TopKSAE(nn.Module):
    """A TopK SAE with its input scale; `forward(x, dense=True)` is the dense reference."""

    def __init__(self, d_in: int, n_latents: int, k: int, k_aux: int, seed: int = 0) -> None:
        super().__init__()
        self.d_in, self.n_latents, self.k, self.k_aux = d_in, n_latents, k, k_aux
        generator = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(n_latents, d_in, generator=generator)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.w_dec = nn.Parameter(w_dec)
        self.w_enc = nn.Parameter(w_dec.clone())
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_pre = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("input_scale", torch.ones(()))

    # ------------------------------------------------------------------ the function
    def forward(self, x_BD: Tensor, dead_F: Tensor | None = None, dense: bool = False) -> SAEOutput:
        """Encode, decode, and (when latents are dead) the AuxK reconstruction of the residual."""
        x_centered = x_BD - self.b_pre
        if dense:
            z_BK, idx_BK, recon = self._dense_autoencode(x_centered)
        else:
            preacts_BK, idx_BK = topk_preacts(x_centered.detach(), self.w_enc, self.b_enc, self.k)
            z_BK = SparseEncode.apply(x_centered, self.w_enc, self.b_enc, preacts_BK, idx_BK)
            recon = SparseDecode.apply(z_BK, idx_BK, self.w_dec)
        recon = recon + self.b_pre
        aux = None
        if dead_F is not None and bool(dead_F.any()):
            aux = self._aux_recon(x_centered.detach(), dead_F, dense)
        return SAEOutput(recon, z_BK, idx_BK, aux)

    def _dense_autoencode(self, x_centered: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        preacts_BF = x_centered @ self.w_enc.T + self.b_enc
        values, idx = preacts_BF.topk(self.k, dim=1)
        idx, order = idx.sort(dim=1)
        z_BK = values.gather(1, order).relu()
        z_BF = torch.zeros_like(preacts_BF).scatter(1, idx, z_BK)
        return z_BK, idx, z_BF @ self.w_dec

    def _aux_recon(self, x_centered: Tensor, dead_F: Tensor, dense: bool) -> Tensor:
        """Reconstruct with the top k_aux dead latents only (their pre-activations are exact)."""
        dead_idx = dead_F.nonzero().squeeze(1)
        k_aux = min(self.k_aux, len(dead_idx))
        if dense:
            preacts_BF = x_centered @ self.w_enc.T + self.b_enc
            masked = preacts_BF.masked_fill(~dead_F, float("-inf"))
            values, idx = masked.topk(k_aux, dim=1)
            z_BF = torch.zeros_like(preacts_BF).scatter(1, idx, values.relu())
            return z_BF @ self.w_dec
        with torch.no_grad():
            dead_preacts = torch.addmm(self.b_enc[dead_idx], x_centered, self.w_enc[dead_idx].T)
            values, position = dead_preacts.topk(k_aux, dim=1)
            idx, order = dead_idx[position].sort(dim=1)
            values = values.gather(1, order)
        z_BK = SparseEncode.apply(x_centered, self.w_enc, self.b_enc, values, idx)
        return SparseDecode.apply(z_BK, idx, self.w_dec)

    # ------------------------------------------------------------ the recipe's rules
    @torch.no_grad()
    def initialise_from(self, sample_ND: Tensor) -> None:
        """Input scale to unit mean squared norm; b_pre at the geometric median of a sample."""
        self.input_scale.fill_(float(sample_ND.pow(2).sum(dim=1).mean().rsqrt()))
        self.b_pre.copy_(geometric_median(sample_ND * self.input_scale))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Keep only the part of each decoder row's gradient that is orthogonal to the row."""
        if self.w_dec.grad is not None:
            parallel = (self.w_dec.grad * self.w_dec).sum(dim=1, keepdim=True)
            self.w_dec.grad.sub_(parallel * self.w_dec)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.w_dec.div_(self.w_dec.norm(dim=1, keepdim=True))

    # --------------------------------------------------------------------- saving
    def hyperparameters(self) -> dict[str, int]:
        return {"d_in": self.d_in, "n_latents": self.n_latents, "k": self.k, "k_aux": self.k_aux}

    def save(self, folder: Path, cfg: dict[str, Any]) -> None:
        """cfg.json (the training config plus the SAE's shape) and sae.safetensors."""
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        save_file(tensors, folder / "sae.safetensors")
        (folder / "cfg.json").write_text(json.dumps({**cfg, **self.hyperparameters()}, indent=2))

    @classmethod
    def load(cls, folder: Path, device: str = "cpu") -> TopKSAE:
        cfg = json.loads((folder / "cfg.json").read_text())
        sae = cls(cfg["d_in"], cfg["n_latents"], cfg["k"], cfg["k_aux"])
        sae.load_state_dict(load_file(folder / "sae.safetensors", device=device))
        return sae.to(device)


def losses(out: SAEOutput, x_BD: Tensor) -> dict[str, Tensor]:
    """Reconstruction MSE (sum over D, mean over B) and normalised AuxK loss, and their total."""
    mse = (out.recon_BD - x_BD).pow(2).sum(dim=1).mean()
    aux = torch.zeros((), device=x_BD.device)
    if out.aux_recon_BD is not None:
        residual = (x_BD - out.recon_BD).detach()
        aux = (out.aux_recon_BD - residual).pow(2).sum(dim=1).mean() / residual.pow(2).sum(
            dim=1
        ).mean().clamp_min(1e-12)
    return {"mse": mse, "aux": aux, "loss": mse + AUX_COEFFICIENT * aux}


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
