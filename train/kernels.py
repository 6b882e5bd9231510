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
- `SparseEncode`: z = relu(pre-activations at the selected entries); the weight gradient is
  scattered to the K active rows per token, never formed as a dense (B, F) product.
- `SparseDecode`: x̂ = Σ_k z_bk W_dec[idx_bk] (embedding_bag); its weight gradient is scattered the
  same way and its gradient w.r.t. z is a sampled product.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn import functional

SelectionPrecision = Literal["float32", "bfloat16"]

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


def gather_dot(idx_BK: Tensor, a_BD: Tensor, m_FD: Tensor) -> Tensor:
    """out[b, j] = a[b] · m[idx[b, j]] for sorted idx rows, without a (B, F) matrix.

    The CPU has a fast float32 sampled product (SDDMM), checked against the dense product by
    tests; on CUDA the rows are gathered in blocks and multiplied by a plain float32 bmm, whose
    precision we know, rather than cuSPARSE's sampled product, which no test here can check.
    """
    if a_BD.device.type == "cpu":
        zeros = torch.zeros_like(idx_BK, dtype=a_BD.dtype)
        pattern = selection_matrix(idx_BK, zeros, m_FD.shape[0])
        return torch.sparse.sampled_addmm(pattern, a_BD, m_FD.T).values().view(idx_BK.shape)
    out = torch.empty(idx_BK.shape, device=a_BD.device, dtype=a_BD.dtype)
    block = max(1, 2**28 // (idx_BK.shape[1] * m_FD.shape[1]))  # ~1 GB of gathered float32 rows
    for start in range(0, len(idx_BK), block):
        rows = m_FD[idx_BK[start : start + block]]
        out[start : start + block] = torch.bmm(rows, a_BD[start : start + block, :, None])[..., 0]
    return out


def scatter_outer(idx_BK: Tensor, values_BK: Tensor, a_BD: Tensor, n_latents: int) -> Tensor:
    """out[f] = Σ_{b,j: idx[b,j] = f} values[b, j] · a[b], as a dense (F, D) gradient.

    On the CPU a transposed sparse product is fastest (0.12 s against 0.20 s for index_add at
    the full configuration); CUDA has no kernel for it, and index_add is fast there.
    """
    if a_BD.device.type == "cpu":
        return selection_matrix(idx_BK, values_BK, n_latents).t() @ a_BD
    rows = (values_BK[:, :, None] * a_BD[:, None, :]).flatten(0, 1)
    out = torch.zeros(n_latents, a_BD.shape[1], device=a_BD.device, dtype=a_BD.dtype)
    return out.index_add_(0, idx_BK.flatten(), rows)


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
    if precision == "float32":
        values, idx = dense_preacts(x_BD, w_enc_FD, b_enc_F).topk(k, dim=1)
        return _sorted_by_latent(values, idx)
    with torch.no_grad():
        x_bf, w_bf, b_bf = x_BD.bfloat16(), w_enc_FD.bfloat16(), b_enc_F.bfloat16()
        if x_BD.device.type != "cuda":  # CPUs mostly emulate bfloat16 products, 3-40x slower
            x_bf, w_bf, b_bf = x_bf.float(), w_bf.float(), b_bf.float()
        idx = (
            torch.addmm(b_bf, x_bf, w_bf.T).topk(k, dim=1, sorted=False).indices.sort(dim=1).values
        )
        values = gather_dot(idx, x_BD, w_enc_FD) + b_enc_F[idx]
    return values, idx


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
    ) -> Tensor:
        ctx.save_for_backward(x_BD, w_enc_FD, preacts_BK, idx_BK)
        ctx.relu = relu
        return preacts_BK.clamp_min(0) if relu else preacts_BK.clone()

    @staticmethod
    def backward(ctx: Any, grad_z_BK: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x_BD, w_enc_FD, preacts_BK, idx_BK = ctx.saved_tensors
        grad_pre_BK = grad_z_BK * (preacts_BK > 0) if ctx.relu else grad_z_BK
        n_latents = w_enc_FD.shape[0]
        grad_x = gather_sum(idx_BK, grad_pre_BK, w_enc_FD) if ctx.needs_input_grad[0] else None
        grad_w = scatter_outer(idx_BK, grad_pre_BK, x_BD, n_latents)
        grad_b = torch.zeros(n_latents, device=x_BD.device, dtype=grad_pre_BK.dtype)
        grad_b.index_add_(0, idx_BK.flatten(), grad_pre_BK.flatten())
        return grad_x, grad_w, grad_b, None, None, None


class SparseDecode(torch.autograd.Function):
    """x̂_BD = Σ_k z_bk W_dec[idx_bk], without b_pre."""

    @staticmethod
    def forward(ctx: Any, z_BK: Tensor, idx_BK: Tensor, w_dec_FD: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z_BK, idx_BK, w_dec_FD)
        return gather_sum(idx_BK, z_BK, w_dec_FD)

    @staticmethod
    def backward(ctx: Any, grad_out_BD: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        z_BK, idx_BK, w_dec_FD = ctx.saved_tensors
        grad_z = gather_dot(idx_BK, grad_out_BD, w_dec_FD)
        grad_w = scatter_outer(idx_BK, z_BK, grad_out_BD, w_dec_FD.shape[0])
        return grad_z, None, grad_w
