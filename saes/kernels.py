"""The TopK SAE's sparse paths; each equals a dense computation (tests/test_kernels.py checks it).

Shapes: B tokens, D width, F latents, K active latents per token, K' candidates per token.

A TopK SAE touches K of F latents per token, yet a dense implementation pays for all F three more
times after the encoder: the decoder product, and the two gradient products behind it. Here only
the encoder's selection is dense; everything else works on the (B, K) active entries:

- `topk_preacts`: top-K of x·W_encᵀ + b_enc, selected by a float32 product, or by a bfloat16
  one (a GPU's fast path) whose K winners are then re-scored exactly in float32 by a sampled
  product (SDDMM), so the kept values are exact and only near-ties may be chosen differently. (A
  certified exact search with a dense fallback stood here until issue 12: once training starts,
  the K-th and 2K-th pre-activations of nearly every token lie within bfloat16's error bound, so
  ~all tokens fell back to the dense product and steps slowed 2x: BENCHMARKS.md.)
- `kept_preacts`: for rules that keep a varying number of latents per token (BatchTopK and
  Matryoshka SAEs, whose rules live in saes/architectures/), the kept pre-activations padded
  to one width K', so the two functions below serve all three architectures unchanged.
- `SparseEncode`: z = relu(pre-activations at the selected entries); the weight gradient is
  scattered to the K active rows per token, never formed as a dense (B, F) product.
- `SparseDecode`: x̂ = Σ_k z_bk W_dec[idx_bk] (embedding_bag); its weight gradient is scattered the
  same way and its gradient w.r.t. z is a sampled product.

The two products behind the gradients have one named implementation per device family:
`gather_dot_sddmm` and `scatter_outer_csr` (the CPU's sparse products), `gather_dot_bmm` and
`scatter_outer_index_add` (what CUDA runs). `Kernels` chooses them, by default by device; tests
run every one on the CPU, so CI checks the code a GPU runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn import functional

SelectionPrecision = Literal["float32", "bfloat16"]
GatherDotImpl = Literal["sddmm", "bmm"]
ScatterOuterImpl = Literal["csr", "index_add"]

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def selection_matrix(idx_BK: Tensor, values_BK: Tensor, n_latents: int) -> Tensor:
    """The (B, F) sparse matrix with values_BK at columns idx_BK (sorted per row), as CSR."""
    n_tokens, k = idx_BK.shape
    crow = torch.arange(0, n_tokens * k + 1, k, device=idx_BK.device)
    return torch.sparse_csr_tensor(
        crow,
        idx_BK.flatten(),
        values_BK.flatten(),
        size=(n_tokens, n_latents),
        check_invariants=False,
    )


def gather_dot_sddmm(idx_BK: Tensor, a_BD: Tensor, m_FD: Tensor) -> Tensor:
    """`gather_dot` as the CPU's fast float32 sampled product (SDDMM), checked against the dense
    product by tests."""
    zeros = torch.zeros_like(idx_BK, dtype=a_BD.dtype)
    pattern = selection_matrix(idx_BK, zeros, m_FD.shape[0])
    return torch.sparse.sampled_addmm(pattern, a_BD, m_FD.T).values().view(idx_BK.shape)


def gather_dot_bmm(idx_BK: Tensor, a_BD: Tensor, m_FD: Tensor) -> Tensor:
    """`gather_dot` for CUDA: rows gathered in blocks and multiplied by a plain float32 bmm,
    whose precision we know, rather than cuSPARSE's sampled product."""
    out = torch.empty(idx_BK.shape, device=a_BD.device, dtype=a_BD.dtype)
    block = max(1, 2**28 // (idx_BK.shape[1] * m_FD.shape[1]))  # ~1 GB of gathered float32 rows
    for start in range(0, len(idx_BK), block):
        rows = m_FD[idx_BK[start : start + block]]
        out[start : start + block] = torch.bmm(rows, a_BD[start : start + block, :, None])[..., 0]
    return out


def scatter_outer_csr(idx_BK: Tensor, values_BK: Tensor, a_BD: Tensor, n_latents: int) -> Tensor:
    """`scatter_outer` as a transposed sparse product: fastest on the CPU (0.12 s against 0.20 s
    for index_add at the full configuration); CUDA has no kernel for it."""
    return selection_matrix(idx_BK, values_BK, n_latents).t() @ a_BD


def scatter_outer_index_add(
    idx_BK: Tensor, values_BK: Tensor, a_BD: Tensor, n_latents: int
) -> Tensor:
    """`scatter_outer` by index_add, fast on CUDA."""
    rows = (values_BK[:, :, None] * a_BD[:, None, :]).flatten(0, 1)
    out = torch.zeros(n_latents, a_BD.shape[1], device=a_BD.device, dtype=a_BD.dtype)
    return out.index_add_(0, idx_BK.flatten(), rows)


GATHER_DOT: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "sddmm": gather_dot_sddmm,
    "bmm": gather_dot_bmm,
}
SCATTER_OUTER: dict[str, Callable[[Tensor, Tensor, Tensor, int], Tensor]] = {
    "csr": scatter_outer_csr,
    "index_add": scatter_outer_index_add,
}


@dataclass(frozen=True)
class Kernels:
    """Which implementation of each product the sparse paths run; None = the device's own."""

    gather_dot: GatherDotImpl | None = None
    scatter_outer: ScatterOuterImpl | None = None


def gather_dot(
    idx_BK: Tensor, a_BD: Tensor, m_FD: Tensor, impl: GatherDotImpl | None = None
) -> Tensor:
    """out[b, j] = a[b] · m[idx[b, j]] for sorted idx rows, without a (B, F) matrix; `impl`
    defaults to sddmm on the CPU, bmm elsewhere."""
    impl = impl or ("sddmm" if a_BD.device.type == "cpu" else "bmm")
    return GATHER_DOT[impl](idx_BK, a_BD, m_FD)


def scatter_outer(
    idx_BK: Tensor,
    values_BK: Tensor,
    a_BD: Tensor,
    n_latents: int,
    impl: ScatterOuterImpl | None = None,
) -> Tensor:
    """out[f] = Σ_{b,j: idx[b,j] = f} values[b, j] · a[b], as a dense (F, D) gradient; `impl`
    defaults to csr on the CPU, index_add elsewhere."""
    impl = impl or ("csr" if a_BD.device.type == "cpu" else "index_add")
    return SCATTER_OUTER[impl](idx_BK, values_BK, a_BD, n_latents)


def gather_sum(idx_BK: Tensor, values_BK: Tensor, m_FD: Tensor) -> Tensor:
    """out[b] = Σ_j values[b, j] · m[idx[b, j]]."""
    return functional.embedding_bag(idx_BK, m_FD, per_sample_weights=values_BK, mode="sum")


def dense_preacts(x_BD: Tensor, w_enc_FD: Tensor, b_enc_F: Tensor) -> Tensor:
    return torch.addmm(b_enc_F, x_BD, w_enc_FD.T)


def topk_preacts(
    x_BD: Tensor, w_enc_FD: Tensor, b_enc_F: Tensor, k: int, precision: SelectionPrecision
) -> tuple[Tensor, Tensor]:
    """Top-k pre-activations and their latents, idx sorted ascending per token.

    "float32": the exact selection. "bfloat16": the k best by a bfloat16 product (on a CPU, the
    same rounded inputs multiplied in float32: the products of bfloat16 numbers are exact in
    float32, so only the order of accumulation differs), their values re-scored in float32.
    """
    product_BF = selection_product(x_BD, w_enc_FD, b_enc_F, precision)
    if precision == "float32":
        return _sorted_by_latent(*product_BF.topk(k, dim=1))
    idx = product_BF.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
    return _rescored(idx, x_BD, w_enc_FD, b_enc_F), idx


def selection_product(
    x_BD: Tensor, w_enc_FD: Tensor, b_enc_F: Tensor, precision: SelectionPrecision
) -> Tensor:
    """The (B, F) pre-activations a selection ranks by: exact in "float32", else bfloat16's."""
    if precision == "float32":
        return dense_preacts(x_BD, w_enc_FD, b_enc_F)
    with torch.no_grad():
        x_bf, w_bf, b_bf = x_BD.bfloat16(), w_enc_FD.bfloat16(), b_enc_F.bfloat16()
        if x_BD.device.type != "cuda":  # CPUs mostly emulate bfloat16 products, 3-40x slower
            x_bf, w_bf, b_bf = x_bf.float(), w_bf.float(), b_bf.float()
        return torch.addmm(b_bf, x_bf, w_bf.T)


@torch.no_grad()
def _rescored(idx_BK: Tensor, x_BD: Tensor, w_enc_FD: Tensor, b_enc_F: Tensor) -> Tensor:
    """Exact float32 pre-activations at the chosen latents (a sampled product)."""
    return gather_dot(idx_BK, x_BD, w_enc_FD) + b_enc_F[idx_BK]


KeepRule = Callable[[Tensor], Tensor]
"""Given the (B, C) exact pre-activations of each token's C best candidates, which to keep."""


@torch.no_grad()
def kept_preacts(
    x_BD: Tensor,
    w_enc_FD: Tensor,
    b_enc_F: Tensor,
    keep: KeepRule,
    precision: SelectionPrecision,
    candidates: int,
) -> tuple[Tensor, Tensor]:
    """Pre-activations kept by a rule that may keep a different number per token (BatchTopK's
    batch-wide top B·k, or a threshold), in the padded (B, K') layout the sparse paths take.

    K' is the most any token keeps; a token that keeps fewer fills its row with other candidate
    latents whose pre-activation is −inf, so SparseEncode's ReLU makes them 0 with no gradient
    and SparseDecode adds nothing for them. Each token offers its `candidates` best latents; if
    one token keeps them all, the offer doubles (up to all F), so the result is the rule applied
    to every latent. idx is ascending per row, as everywhere.
    """
    product_BF = selection_product(x_BD, w_enc_FD, b_enc_F, precision)
    n_latents = product_BF.shape[1]
    width = min(candidates, n_latents)
    while True:
        values, idx = product_BF.topk(width, dim=1, sorted=False)
        if precision != "float32":
            values = _rescored(idx, x_BD, w_enc_FD, b_enc_F)
        kept = keep(values)
        if width == n_latents or not bool(kept.all(dim=1).any()):
            break
        width = min(2 * width, n_latents)
    most = max(int(kept.sum(dim=1).max()), 1)
    first = kept.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :most]
    values = values.gather(1, first).masked_fill(~kept.gather(1, first), float("-inf"))
    return _sorted_by_latent(values, idx.gather(1, first))


def _sorted_by_latent(values: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    idx, order = idx.sort(dim=1)
    return values.gather(1, order), idx


class SparseEncode(torch.autograd.Function):
    """z_BK = relu(pre-activations at idx), or the raw values when `relu` is False; gradients
    only at the active entries."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_BD: Tensor,
        w_enc_FD: Tensor,
        b_enc_F: Tensor,
        preacts_BK: Tensor,
        idx_BK: Tensor,
        relu: bool,
        kernels: Kernels = Kernels(),
    ) -> Tensor:
        ctx.save_for_backward(x_BD, w_enc_FD, preacts_BK, idx_BK)
        ctx.relu, ctx.kernels = relu, kernels
        return preacts_BK.clamp_min(0) if relu else preacts_BK.clone()

    @staticmethod
    def backward(ctx: Any, grad_z_BK: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x_BD, w_enc_FD, preacts_BK, idx_BK = ctx.saved_tensors
        grad_pre_BK = grad_z_BK * (preacts_BK > 0) if ctx.relu else grad_z_BK
        n_latents = w_enc_FD.shape[0]
        grad_x = gather_sum(idx_BK, grad_pre_BK, w_enc_FD) if ctx.needs_input_grad[0] else None
        grad_w = scatter_outer(idx_BK, grad_pre_BK, x_BD, n_latents, ctx.kernels.scatter_outer)
        grad_b = torch.zeros(n_latents, device=x_BD.device, dtype=grad_pre_BK.dtype)
        grad_b.index_add_(0, idx_BK.flatten(), grad_pre_BK.flatten())
        return grad_x, grad_w, grad_b, None, None, None, None


class SparseDecode(torch.autograd.Function):
    """x̂_BD = Σ_k z_bk W_dec[idx_bk], without b_pre."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        z_BK: Tensor,
        idx_BK: Tensor,
        w_dec_FD: Tensor,
        kernels: Kernels = Kernels(),
    ) -> Tensor:
        ctx.save_for_backward(z_BK, idx_BK, w_dec_FD)
        ctx.kernels = kernels
        return gather_sum(idx_BK, z_BK, w_dec_FD)

    @staticmethod
    def backward(ctx: Any, grad_out_BD: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        z_BK, idx_BK, w_dec_FD = ctx.saved_tensors
        kernels = ctx.kernels
        grad_z = gather_dot(idx_BK, grad_out_BD, w_dec_FD, kernels.gather_dot)
        grad_w = scatter_outer(idx_BK, z_BK, grad_out_BD, w_dec_FD.shape[0], kernels.scatter_outer)
        return grad_z, None, grad_w, None
