"""AuxK's reconstruction (Gao et al. 2024): the residual rebuilt from each token's k_aux best
dead latents, by their raw pre-activations (no ReLU, so a latent whose pre-activations went
negative everywhere, the usual way to die, still gets a gradient back towards the data).

Two implementations, the same function and gradients (tests/test_kernels.py checks both against
the dense formula over all F latents):

- `aux_recon_sparse`: the B·k_aux kept entries through the sparse kernels (SparseEncode,
  SparseDecode), as the main path. Its work grows with k_aux (512 at d = 1,024), and CUDA's
  gathers and scatters materialise B·k_aux·D floats (8 GB per product at 4,096 tokens).
- `aux_recon_dense_dead`: dense products over the dead columns only, (B, D) x (D, F_dead), four
  of them with the gradients. Dense products run near the machine's peak where gathers do not,
  so this wins until F_dead is many times k_aux (BENCHMARKS.md, "AuxK: sparse against dense over
  the dead latents").

`choose_aux` picks one by that ratio unless `Kernels.aux` names one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from vitscope.saes.kernels import AuxImpl, Kernels, Rows, SparseDecode, SparseEncode

AUX_DENSE_SPAN = {"cpu": 8, "cuda": 128}
"""`choose_aux` takes the dense route while F_dead ≤ this · k_aux, per device type (measured:
BENCHMARKS.md); other devices take CUDA's, unmeasured there."""


def aux_recon_sparse(
    x_BD: Tensor,
    w_enc: Tensor,
    b_enc: Tensor,
    w_dec: Tensor,
    dead_idx: Tensor,
    k_aux: int,
    kernels: Kernels,
) -> Tensor:
    """AuxK's reconstruction from the B·k_aux kept entries, through the sparse kernels."""
    with torch.no_grad():
        dead_preacts = torch.addmm(b_enc[dead_idx], x_BD, w_enc[dead_idx].T)
        values, position = dead_preacts.topk(k_aux, dim=1)
        idx, order = dead_idx[position].sort(dim=1)
        values = values.gather(1, order).flatten()
    rows = Rows.uniform(idx)
    z_N = SparseEncode.apply(x_BD, w_enc, b_enc, values, rows, False, kernels)
    return SparseDecode.apply(z_N, rows, w_dec, kernels)


def aux_recon_dense_dead(
    x_BD: Tensor,
    w_enc: Tensor,
    b_enc: Tensor,
    w_dec: Tensor,
    dead_idx: Tensor,
    k_aux: int,
    kernels: Kernels,
) -> Tensor:
    """AuxK's reconstruction by dense products over the dead columns, the others masked out."""
    preacts_BG = torch.addmm(b_enc[dead_idx], x_BD, w_enc[dead_idx].T)
    position = preacts_BG.detach().topk(k_aux, dim=1, sorted=False).indices
    kept_BG = torch.zeros_like(preacts_BG, dtype=torch.bool).scatter_(1, position, True)
    return (preacts_BG * kept_BG) @ w_dec[dead_idx]


AUX_RECON: dict[str, Callable[..., Tensor]] = {
    "sparse": aux_recon_sparse,
    "dense_dead": aux_recon_dense_dead,
}


def choose_aux(n_dead: int, k_aux: int, device: torch.device) -> AuxImpl:
    """The faster implementation for F_dead dead latents of which each token keeps k_aux."""
    span = AUX_DENSE_SPAN.get(device.type, AUX_DENSE_SPAN["cuda"])
    return "dense_dead" if n_dead <= span * k_aux else "sparse"


def aux_recon(
    x_BD: Tensor,
    w_enc: Tensor,
    b_enc: Tensor,
    w_dec: Tensor,
    dead_F: Tensor,
    k_aux: int,
    kernels: Kernels,
) -> Tensor:
    """AuxK's reconstruction of (B, D) centred inputs from the k_aux best of the dead latents
    (at most all of them), without b_pre; x_BD gets no gradient."""
    dead_idx = dead_F.nonzero().squeeze(1)
    k_aux = min(k_aux, len(dead_idx))
    impl = kernels.aux or choose_aux(len(dead_idx), k_aux, x_BD.device)
    return AUX_RECON[impl](x_BD.detach(), w_enc, b_enc, w_dec, dead_idx, k_aux, kernels)
