"""Matryoshka-BatchTopK (Bussmann et al., "Learning Multi-Level Features with Matryoshka SAEs",
2025; as SAELens' matryoshka_batchtopk): BatchTopK codes whose nested prefixes [0, m) of the
dictionary must each reconstruct too. The loss adds w · ‖x − (W_dec[:m]ᵀ z[:m] + b_pre)‖² for
every inner width m of `matryoshka_widths` to the full reconstruction's, w = `prefix_weight`
(SAELens: 1, unweighted). With the codes' indices ascending, a band of latents [m_i-1, m_i) is a
run of each token's entries: one SparseDecode decodes every (token, band) bag and the prefixes
are the bands' running sums. At inference it is a BatchTopK SAE.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Annotated, Any, ClassVar

from torch import Tensor

from vitscope.saes.architectures.batchtopk import BatchTopKOptions, BatchTopKSAE
from vitscope.saes.kernels import Rows, SparseDecode
from vitscope.saes.sae import SAEOutput, dense_codes, squared_error
from vitscope.support.configs import AtLeast
from vitscope.support.errors import BadSetting


@dataclass(frozen=True)
class MatryoshkaOptions(BatchTopKOptions):
    architecture: ClassVar[str] = "matryoshka"
    matryoshka_widths: tuple[int, ...] = ()
    """The nested prefix sizes whose reconstruction losses are summed, ascending, the last =
    n_latents."""
    prefix_weight: Annotated[float, AtLeast(0)] = 1.0
    """w: each inner prefix's reconstruction loss is weighted by it. Absent from a card: 1, how
    every SAE before format 1.3 was trained (and SAELens trains); it shapes training only."""

    def check(self, n_latents: int) -> None:
        widths = self.matryoshka_widths
        if not (
            widths
            and widths[-1] == n_latents
            and all(a < b for a, b in zip((0, *widths), widths, strict=False))
        ):
            raise BadSetting(
                f"matryoshka_widths must ascend from above 0 to n_latents ({n_latents}), "
                f"not {list(widths)}"
            )


class MatryoshkaSAE(BatchTopKSAE):
    """A Matryoshka-BatchTopK SAE: each inner prefix of the dictionary reconstructs too."""

    Options = MatryoshkaOptions
    saelens_training_architecture = "matryoshka_batchtopk"

    def _reconstructions(self, z_N: Tensor, rows: Rows, dense: bool) -> list[Tensor]:
        """Each prefix's reconstruction, the full one last: the running sums of the bands
        [m_i-1, m_i), all decoded by one SparseDecode over each token's entries cut into bands
        (its latents ascend, so a band is a run of its entries)."""
        widths = self.card.options.matryoshka_widths
        if dense:
            z_BF = dense_codes(z_N, rows, self.n_latents)
            return [z_BF[:, :m] @ self.w_dec[:m] for m in widths]
        bands = rows.split_by_latent(widths[:-1])
        parts = SparseDecode.apply(z_N, bands, self.w_dec, self.kernels)
        return list(accumulate(parts.view(rows.n_tokens, len(widths), -1).unbind(dim=1)))

    def extra_losses(self, out: SAEOutput, x_BD: Tensor) -> dict[str, Tensor]:
        """prefix_mse: the inner prefixes' reconstruction MSEs, summed, times `prefix_weight`."""
        prefix_mse = x_BD.new_zeros(())
        for recon in out.prefix_recons:
            prefix_mse = prefix_mse + squared_error(recon, x_BD)
        return {"prefix_mse": self.card.options.prefix_weight * prefix_mse}

    def _saelens_details(self) -> dict[str, Any]:
        widths = list(self.card.options.matryoshka_widths)
        return {**super()._saelens_details(), "matryoshka_widths": widths}
