"""The TopK SAE's sparse paths; each equals a dense computation (tests/test_kernels.py checks it).

Shapes: B tokens, D width, F latents, K active latents per token, K' candidates per token.

A TopK SAE touches K of F latents per token, yet a dense implementation pays for all F three more
times after the encoder: the decoder product, and the two gradient products behind it. Here only
the encoder's selection is dense; everything else works on the (B, K) active entries:

- `topk_preacts`: exact top-K of x·W_encᵀ + b_enc. Candidates come from one product in bfloat16
  where that is faster than float32; the K' best are re-scored exactly in float32 by a sampled
  product (SDDMM), and every token's selection is certified by a bound on the bfloat16 rounding
  error. Tokens the bound cannot certify are recomputed densely, so the result is always exact.
- `SparseEncode`: z = relu(pre-activations at the selected entries); the weight gradient is
  scattered to the K active rows per token, never formed as a dense (B, F) product.
- `SparseDecode`: x̂ = Σ_k z_bk W_dec[idx_bk] (embedding_bag); its weight gradient is scattered the
  same way and its gradient w.r.t. z is a sampled product.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional

BF16_UNIT_ROUNDOFF = 2.0**-9
"""Relative rounding error of one bfloat16 rounding (8-bit significand, round to nearest)."""

ACCUMULATION_SLACK = 1e-4
"""Bound on float32 accumulation error relative to ‖x‖·‖w‖, far above D · 2⁻²⁴ for D ≤ 16384."""

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


@cache
def bfloat16_is_faster(device: torch.device) -> bool:
    """GPUs always; CPUs only where bfloat16 products beat float32 (many emulate them slowly).

    Costs milliseconds: a tiny product first, where emulated bfloat16 (3-40x slower) shows at
    once, then a medium one (256x1024x1024) to see whether native bfloat16 really is faster.
    """
    if device.type == "cuda":
        return True
    if _product_seconds(torch.bfloat16, 32, 512, 512) > 2 * _product_seconds(
        torch.float32, 32, 512, 512
    ):
        return False
    bf16, fp32 = (
        _product_seconds(dtype, 256, 1024, 1024) for dtype in (torch.bfloat16, torch.float32)
    )
    return bf16 < 0.8 * fp32


def _product_seconds(dtype: torch.dtype, m: int, k: int, n: int, repeats: int = 5) -> float:
    """Fastest of `repeats` (m, k) @ (k, n) products after a warm-up: the least noisy timing."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        timings.append(time.perf_counter() - start)
    return min(timings)


def dense_preacts(x_BD: Tensor, w_enc_FD: Tensor, b_enc_F: Tensor) -> Tensor:
    return torch.addmm(b_enc_F, x_BD, w_enc_FD.T)


def topk_preacts(
    x_BD: Tensor, w_enc_FD: Tensor, b_enc_F: Tensor, k: int, n_candidates: int = 0
) -> tuple[Tensor, Tensor]:
    """Exact top-k pre-activations and their latents, idx sorted ascending per token.

    `n_candidates` (K') > k turns on the certified bfloat16 candidate search; 0 picks 2k where
    bfloat16 is faster than float32 on this device, and the plain dense product elsewhere.
    """
    if n_candidates == 0:
        n_candidates = 2 * k if bfloat16_is_faster(x_BD.device) else k
    if n_candidates <= k:
        values, idx = dense_preacts(x_BD, w_enc_FD, b_enc_F).topk(k, dim=1)
        return _sorted_by_latent(values, idx)
    with torch.no_grad():
        candidates = _bf16_candidates(x_BD, w_enc_FD, b_enc_F, k, n_candidates)
        exact_BC = gather_dot(candidates.idx, x_BD, w_enc_FD) + b_enc_F[candidates.idx]
        values, position = exact_BC.topk(k, dim=1)
        idx = candidates.idx.gather(1, position)
        uncertain = values[:, -1] <= candidates.bound
        if bool(uncertain.any()):
            rows = uncertain.nonzero().squeeze(1)
            values[rows], idx[rows] = dense_preacts(x_BD[rows], w_enc_FD, b_enc_F).topk(k, dim=1)
    return _sorted_by_latent(values, idx)


class _Candidates:
    """The K' best latents by bfloat16 estimate, and per token an upper bound on the exact value
    of every latent that is not a candidate."""

    def __init__(self, idx: Tensor, bound: Tensor) -> None:
        self.idx, self.bound = idx, bound


def _bf16_candidates(
    x_BD: Tensor, w_enc_FD: Tensor, b_enc_F: Tensor, k: int, n_candidates: int
) -> _Candidates:
    x_bf, w_bf, b_bf = x_BD.bfloat16(), w_enc_FD.bfloat16(), b_enc_F.bfloat16()
    with _float32_accumulation():
        estimate_BF = torch.addmm(b_bf, x_bf, w_bf.T)
    estimate, idx = estimate_BF.topk(n_candidates, dim=1, sorted=False)
    del estimate_BF
    # |exact - estimate| <= ‖x-x̃‖‖w‖ + ‖x̃‖‖w-w̃‖ + |b-b̃| + u·|estimate| + slack (Cauchy-Schwarz
    # on the rounded inputs, one output rounding); a non-candidate's estimate is at most the
    # smallest candidate's, and v + u|v| grows with v, so one bound per token covers them all.
    # (‖w - w̃‖ <= u‖w‖ row by row: rounding W's residuals exactly would cost a pass over W.)
    x_norm = x_BD.norm(dim=1)
    w_norm_max = w_enc_FD.norm(dim=1).max()
    input_error = (x_BD - x_bf.float()).norm(dim=1) * w_norm_max + x_bf.float().norm(dim=1) * (
        BF16_UNIT_ROUNDOFF * w_norm_max
    )
    bias_error = (b_enc_F - b_bf.float()).abs().max()
    floor = estimate.float().amin(dim=1)
    bound = (
        floor
        + BF16_UNIT_ROUNDOFF * floor.abs()
        + input_error
        + bias_error
        + ACCUMULATION_SLACK * x_norm * w_norm_max
    )
    return _Candidates(idx.sort(dim=1).values, bound)


@contextmanager
def _float32_accumulation() -> Iterator[None]:
    """cuBLAS may reduce bfloat16 products in bfloat16 unless told not to; the bound assumes float32
    accumulation (as CPU kernels do), so turn that off for the candidate product."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_bf16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction = saved


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
