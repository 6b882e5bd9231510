"""What the log reports: training averages per window, and held-out reconstruction quality.

Held-out MSE is in the SAE's scaled units (E‖x − x̄‖² = 1 on training data). FVU (fraction of
variance unexplained) = Σ‖x̂ − x‖² / Σ‖x − mean(x)‖² and explained variance = 1 − FVU, beside
CLIP-Scope's own definition (`clipscope_ev`), both in the activations' units
(train/explained_variance.py). The reconstruction MSE of every token position (prefix first) is
reported too, since where an SAE fails inside the image is a finding of its own, and so is the
MSE on outlier tokens (norms far above the median, train/outliers.py) apart from the ordinary ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vitscope.saes.sae import SAE, SAEOutput
from vitscope.support.run_log import HeldOut
from vitscope.train.explained_variance import ExplainedVariance, Moments
from vitscope.train.outliers import TokenNorms


@dataclass
class WindowStats:
    """Running sums over the steps of one logging window, kept on the device (no sync per step)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0
    dead_fraction: float = 0.0

    def add(self, terms: dict[str, torch.Tensor], out: SAEOutput, dead_F: torch.Tensor) -> None:
        values = {
            "mse": terms["mse"].detach(),
            "aux_loss": terms["aux"].detach(),
            "l0": out.l0_B().float().mean(),
            "dead": dead_F.float().mean(),
        }
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0) + value
        self.steps += 1

    def summary(self) -> dict[str, float]:
        means = {name: float(total) / max(self.steps, 1) for name, total in self.sums.items()}
        return {
            "mse": means.get("mse", 0.0),
            "aux_loss": means.get("aux_loss", 0.0),
            "l0": means.get("l0", 0.0),
            "dead_fraction": means.get("dead", 0.0),
        }


@torch.no_grad()
def heldout_metrics(
    sae: SAE,
    acts_NTD: torch.Tensor,
    token_slice: slice,
    batch_size: int,
    norms: TokenNorms | None = None,
) -> HeldOut:
    """MSE, both explained variances and L0 on the chosen tokens (outliers left out when `norms`
    excludes them); the MSE on outlier and ordinary tokens apart; MSE at every token position.
    The SAE is evaluated as it is used (in eval mode: a BatchTopK SAE by its threshold)."""
    device = sae.b_pre.device
    was_training = sae.training
    sae.eval()
    n_images, n_tokens, d = acts_NTD.shape
    norms = norms or TokenNorms.of(acts_NTD, token_slice, 0.0)
    norm_NT = acts_NTD.float().norm(dim=2)
    chosen_NT = torch.zeros(n_images, n_tokens, dtype=torch.bool)
    chosen_NT[:, token_slice] = True
    evaluated_NT = chosen_NT & (norm_NT <= norms.exclude_above)
    per_batch = max(1, batch_size // n_tokens)  # whole images per batch
    batches = [
        (acts_NTD[first : first + per_batch], evaluated_NT[first : first + per_batch].to(device))
        for first in range(0, n_images, per_batch)
    ]

    def evaluated(rows_BD: torch.Tensor, kept_IT: torch.Tensor) -> torch.Tensor:
        return rows_BD.view(*kept_IT.shape, d)[kept_IT]

    data = Moments()
    for images, kept_IT in batches:
        data.add(evaluated(images.to(device), kept_IT))
    explained = ExplainedVariance(data)
    errors, l0 = [], []
    for images, kept_IT in batches:
        acts = images.reshape(-1, d).to(device)
        x = sae.training_inputs(acts)
        out = sae.autoencode(x)
        errors.append((out.recon_BD - x).pow(2).sum(dim=1).cpu())
        l0.append(out.l0_B().cpu())
        recon = sae.activation_units(out.recon_BD, acts)
        explained.add(evaluated(acts, kept_IT), evaluated(recon, kept_IT))
    sae.train(was_training)
    error_NT = torch.cat(errors).view(n_images, n_tokens)
    l0_NT = torch.cat(l0).view(n_images, n_tokens).float()
    fvu = explained.fvu()
    outlier_NT = norm_NT > norms.outlier_above
    return HeldOut(
        mse=float(error_NT[evaluated_NT].mean()),
        fvu=fvu,
        explained_variance=1 - fvu,
        clipscope_ev=explained.clipscope_ev(),
        l0=float(l0_NT[evaluated_NT].mean()),
        mse_by_token=tuple(round(v, 6) for v in error_NT.mean(dim=0).tolist()),
        mse_ordinary=_mean_or_none(error_NT[chosen_NT & ~outlier_NT]),
        mse_outlier=_mean_or_none(error_NT[chosen_NT & outlier_NT]),
        outlier_fraction=float(outlier_NT[chosen_NT].float().mean()),
    )


def _mean_or_none(values: torch.Tensor) -> float | None:
    return float(values.mean()) if values.numel() else None
