"""Matryoshka-BatchTopK (Bussmann et al., "Learning Multi-Level Features with Matryoshka SAEs",
2025; as SAELens' matryoshka_batchtopk): BatchTopK codes whose nested prefixes [0, m) of the
dictionary must each reconstruct too. The loss adds ‖x − (W_dec[:m]ᵀ z[:m] + b_pre)‖², unweighted,
for every inner width m of `matryoshka_widths` to the full reconstruction's. With the codes'
indices ascending, a prefix is a mask on the values, so every reconstruction reuses SparseDecode.
At inference it is a BatchTopK SAE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from vitscope.saes.architectures.batchtopk import BatchTopKOptions, BatchTopKSAE
from vitscope.saes.sae import SAEOutput


@dataclass(frozen=True)
class MatryoshkaOptions(BatchTopKOptions):
    architecture: ClassVar[str] = "matryoshka"
    matryoshka_widths: tuple[int, ...] = ()
    """The nested prefix sizes whose reconstruction losses are summed, ascending, the last =
    n_latents."""

    def check(self, n_latents: int) -> None:
        widths = self.matryoshka_widths
        if not (
            widths
            and widths[-1] == n_latents
            and all(a < b for a, b in zip((0, *widths), widths, strict=False))
        ):
            raise ValueError(
                f"matryoshka_widths must ascend from above 0 to n_latents ({n_latents}), "
                f"not {list(widths)}"
            )


class MatryoshkaSAE(BatchTopKSAE):
    """A Matryoshka-BatchTopK SAE: each inner prefix of the dictionary reconstructs too."""

    Options = MatryoshkaOptions
    saelens_training_architecture = "matryoshka_batchtopk"

    def extra_losses(self, out: SAEOutput, x_BD: Tensor) -> dict[str, Tensor]:
        """prefix_mse: the inner prefixes' reconstruction MSEs, summed."""
        prefix_mse = x_BD.new_zeros(())
        for m in self.card.options.matryoshka_widths[:-1]:
            z_BK = out.z_BK * (out.idx_BK < m)
            recon = self._decoded(z_BK, out.idx_BK, out.dense) + self.b_pre
            prefix_mse = prefix_mse + (recon - x_BD).pow(2).sum(dim=1).mean()
        return {"prefix_mse": prefix_mse}

    def _saelens_details(self) -> dict[str, Any]:
        widths = list(self.card.options.matryoshka_widths)
        return {**super()._saelens_details(), "matryoshka_widths": widths}
