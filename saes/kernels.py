"""The TopK SAE's sparse paths; each equals a dense computation (tests/test_kernels.py checks it).

Shapes: B tokens, D width, F latents, K active latents per token, N kept entries of a batch in
all (B·K for TopK and for BatchTopK's batch rule).

A TopK SAE touches K of F latents per token, yet a dense implementation pays for all F three more
times after the encoder: the decoder product, and the two gradient products behind it. Here only
the encoder's selection is dense; everything else works on the N kept entries, flat in CSR order
(`Rows`: row pointers and latent indices), so a rule that keeps a varying number per token costs
what TopK's k per token does:

- `topk_preacts`: top-K of x·W_encᵀ + b_enc, selected by a float32 product, or by a bfloat16
  one (a GPU's fast path) whose K winners are then re-scored exactly in float32 by a sampled
  product (SDDMM), so the kept values are exact and only near-ties may be chosen differently. (A
  certified exact search with a dense fallback stood here until issue 12: once training starts,
  the K-th and 2K-th pre-activations of nearly every token lie within bfloat16's error bound, so
  ~all tokens fell back to the dense product and steps slowed 2x: BENCHMARKS.md.)
- `kept_preacts`: for rules that keep a varying number of latents per token (BatchTopK and
  Matryoshka SAEs, whose rules live in saes/architectures/), the N kept entries, flat; `padded`
  turns them into the (B, K') codes users get.
- `SparseEncode`: z = relu(pre-activations at the selected entries); the weight gradient is
  scattered to the N entries' rows, never formed as a dense (B, F) product.
- `SparseDecode`: x̂_b = Σ z_n W_dec[idx_n] over token b's entries (embedding_bag); its weight
  gradient is scattered the same way and its gradient w.r.t. z is a sampled product.

The two products behind the gradients have one named implementation per device family:
`gather_dot_sddmm` and `scatter_outer_csr` (the CPU's sparse products), `gather_dot_rows` and
`scatter_outer_index_add` (what CUDA runs). `Kernels` chooses them, by default by device; tests
run every one on the CPU, so CI checks the code a GPU runs.

Flat gathers use `index_select`, not `t[idx]`: on the CPU, advanced indexing with 10^5 indices
took 3-10x longer (178,000 values of a (4,096, 2,048) product: 3.7 ms against 0.33 ms).
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
GatherDotImpl = Literal["sddmm", "rows"]
ScatterOuterImpl = Literal["csr", "index_add"]
AuxImpl = Literal["sparse", "dense_dead"]

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


@dataclass(frozen=True)
class Rows:
    """Which latents each of B tokens keeps, flat in CSR order: token b keeps
    idx_N[crow_B1[b] : crow_B1[b + 1]], ascending. N = B·k with crow = 0, k, 2k, ... for TopK;
    BatchTopK and Matryoshka keep B·k in all, a varying number per token, at the same cost."""

    crow: Tensor
    idx: Tensor

    @classmethod
    def uniform(cls, idx_BK: Tensor) -> Rows:
        """K latents per token, (B, K) with each row ascending."""
        n_tokens, k = idx_BK.shape
        crow = torch.arange(0, n_tokens * k + 1, k, device=idx_BK.device)
        return cls(crow, idx_BK.flatten())

    @classmethod
    def from_flat(cls, flat_N: Tensor, n_tokens: int, n_latents: int) -> Rows:
        """Entries given by ascending positions in a row-major (B, F) matrix (CSR's order)."""
        tokens = flat_N // n_latents
        return cls(_row_pointers(tokens, n_tokens), flat_N - tokens * n_latents)

    @classmethod
    def cat(cls, parts: list[Rows]) -> Rows:
        """The tokens of several Rows, one after another."""
        ends = torch.stack([part.crow[-1] for part in parts]).cumsum(dim=0)
        crows = [
            parts[0].crow,
            *(p.crow[1:] + end for p, end in zip(parts[1:], ends[:-1], strict=True)),
        ]
        return cls(torch.cat(crows), torch.cat([part.idx for part in parts]))

    @property
    def n_tokens(self) -> int:
        return len(self.crow) - 1

    def split_by_latent(self, bounds: tuple[int, ...]) -> Rows:
        """Each token's entries cut at the latent `bounds` (ascending) into len(bounds) + 1
        consecutive bags, bag b·(len(bounds) + 1) + i holding token b's latents of band i: a
        token's latents ascend, so each band is a run of its entries and the CSR order stays."""
        bounds_M = torch.tensor(bounds, dtype=self.idx.dtype, device=self.idx.device)
        n_bands = len(bounds) + 1
        band_N = torch.bucketize(self.idx, bounds_M, right=True)
        bag_N = self.token_of_entry() * n_bands + band_N
        return Rows(_row_pointers(bag_N, self.n_tokens * n_bands), self.idx)

    def token_of_entry(self) -> Tensor:
        """(N,) the token each entry belongs to."""
        tokens = torch.arange(self.n_tokens, device=self.crow.device)
        return tokens.repeat_interleave(self.crow.diff(), output_size=len(self.idx))


def _row_pointers(tokens_N: Tensor, n_tokens: int) -> Tensor:
    """CSR row pointers (B + 1,) of entries whose tokens ascend."""
    crow = torch.zeros(n_tokens + 1, dtype=torch.long, device=tokens_N.device)
    torch.cumsum(torch.bincount(tokens_N, minlength=n_tokens), dim=0, out=crow[1:])
    return crow


def selection_matrix(rows: Rows, values_N: Tensor, n_latents: int) -> Tensor:
    """The (B, F) sparse matrix with values_N at the rows' entries, as CSR."""
    return torch.sparse_csr_tensor(
        rows.crow,
        rows.idx,
        values_N,
        size=(rows.n_tokens, n_latents),
        check_invariants=False,
    )


def gather_dot_sddmm(rows: Rows, a_BD: Tensor, m_FD: Tensor) -> Tensor:
    """`gather_dot` as the CPU's fast float32 sampled product (SDDMM), checked against the dense
    product by tests."""
    pattern = selection_matrix(rows, torch.zeros_like(rows.idx, dtype=a_BD.dtype), len(m_FD))
    return torch.sparse.sampled_addmm(pattern, a_BD, m_FD.T).values()


def gather_dot_rows(rows: Rows, a_BD: Tensor, m_FD: Tensor) -> Tensor:
    """`gather_dot` for CUDA: the rows gathered in blocks and multiplied in plain float32, whose
    precision we know, rather than cuSPARSE's sampled product."""
    tokens = rows.token_of_entry()
    out = torch.empty(len(rows.idx), device=a_BD.device, dtype=a_BD.dtype)
    block = max(1, 2**28 // m_FD.shape[1])  # ~1 GB of gathered float32 rows
    for start in range(0, len(out), block):
        part = slice(start, start + block)
        out[part] = (m_FD[rows.idx[part]] * a_BD[tokens[part]]).sum(dim=1)
    return out


def scatter_outer_csr(rows: Rows, values_N: Tensor, a_BD: Tensor, n_latents: int) -> Tensor:
    """`scatter_outer` as a transposed sparse product: fastest on the CPU (0.12 s against 0.20 s
    for index_add at the full configuration); CUDA has no kernel for it."""
    return selection_matrix(rows, values_N, n_latents).t() @ a_BD


def scatter_outer_index_add(rows: Rows, values_N: Tensor, a_BD: Tensor, n_latents: int) -> Tensor:
    """`scatter_outer` by index_add, fast on CUDA."""
    contributions = values_N[:, None] * a_BD[rows.token_of_entry()]
    out = torch.zeros(n_latents, a_BD.shape[1], device=a_BD.device, dtype=a_BD.dtype)
    return out.index_add_(0, rows.idx, contributions)


GATHER_DOT: dict[str, Callable[[Rows, Tensor, Tensor], Tensor]] = {
    "sddmm": gather_dot_sddmm,
    "rows": gather_dot_rows,
}
SCATTER_OUTER: dict[str, Callable[[Rows, Tensor, Tensor, int], Tensor]] = {
    "csr": scatter_outer_csr,
    "index_add": scatter_outer_index_add,
}


@dataclass(frozen=True)
class Kernels:
    """Which implementation of each product the sparse paths run; None = the device's own."""

    gather_dot: GatherDotImpl | None = None
    scatter_outer: ScatterOuterImpl | None = None
    aux: AuxImpl | None = None
    """AuxK's reconstruction (saes/aux.py); None = by the dead latents' count against k_aux."""


def gather_dot(rows: Rows, a_BD: Tensor, m_FD: Tensor, impl: GatherDotImpl | None = None) -> Tensor:
    """out[n] = a[b] · m[idx[n]] for each entry n of token b, without a (B, F) matrix; `impl`
    defaults to sddmm on the CPU, rows elsewhere."""
    impl = impl or ("sddmm" if a_BD.device.type == "cpu" else "rows")
    return GATHER_DOT[impl](rows, a_BD, m_FD)


def scatter_outer(
    rows: Rows,
    values_N: Tensor,
    a_BD: Tensor,
    n_latents: int,
    impl: ScatterOuterImpl | None = None,
) -> Tensor:
    """out[f] = Σ_{n: idx[n] = f} values[n] · a[token of n], as a dense (F, D) gradient; `impl`
    defaults to csr on the CPU, index_add elsewhere."""
    impl = impl or ("csr" if a_BD.device.type == "cpu" else "index_add")
    return SCATTER_OUTER[impl](rows, values_N, a_BD, n_latents)


def gather_sum(rows: Rows, values_N: Tensor, m_FD: Tensor) -> Tensor:
    """out[b] = Σ values[n] · m[idx[n]] over token b's entries."""
    return functional.embedding_bag(
        rows.idx,
        m_FD,
        rows.crow,
        mode="sum",
        per_sample_weights=values_N,
        include_last_offset=True,
    )


TOPK_GROUP = 32
"""Columns per group of `topk_by_group_maxima`: the fastest of 8, 16 and 32 at F = 2,048 and
4,096, and faster than 64 at 4,096 (one thread, BENCHMARKS.md, issue 23)."""
GROUPED_TOPK_SPAN = 128
"""`top_per_row` takes the group maxima's route while F ≤ this · m: PyTorch's CPU top-m is a
heap whose replacements grow with m / F (top-64 of 4,096 cost 1.4-1.7x top-32's); at F = 65,536
and m = 64 the plain heap was 1.4x faster than the grouped route."""


def top_per_row(values_BF: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Each row's m largest values and their columns, unsorted, as `topk(m, dim=1,
    sorted=False)` up to the order of ties: by `topk_by_group_maxima` on the CPU where m is
    large against the row, else by `topk`."""
    width = values_BF.shape[1]
    if (
        values_BF.device.type == "cpu"
        and width % TOPK_GROUP == 0
        and m * TOPK_GROUP <= width <= GROUPED_TOPK_SPAN * m
    ):
        return topk_by_group_maxima(values_BF, m)
    return values_BF.topk(m, dim=1, sorted=False)


def topk_by_group_maxima(
    values_BF: Tensor, m: int, group: int = TOPK_GROUP
) -> tuple[Tensor, Tensor]:
    """Each row's m largest values and their columns, unsorted, exactly, without a heap over
    the whole row. Cut each row into groups of `group` columns; the m-th largest group maximum
    is a cut below which none of the row's m largest lies (the m best groups' maxima are m
    values at or above it), and only ~1.4m values per row pass it (87 of 4,096 for m = 64).
    Those are gathered into a (B, most passing) matrix, padded with -inf, whose top m is the
    row's. F must be a multiple of `group` with at least m groups."""
    n_rows, width = values_BF.shape
    maxima_BG = values_BF.view(n_rows, width // group, group).amax(dim=2)
    cut_B1 = maxima_BG.topk(m, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    flat_N = (values_BF >= cut_B1).view(-1).nonzero().squeeze(1)
    rows_N = flat_N // width
    crow = _row_pointers(rows_N, n_rows)
    most = int(crow.diff().max())
    place_N = (
        torch.arange(len(flat_N), device=values_BF.device)
        + rows_N * most
        - crow.index_select(0, rows_N)
    )
    candidates_BC = values_BF.new_full((n_rows * most,), float("-inf"))
    candidates_BC.scatter_(0, place_N, values_BF.view(-1).index_select(0, flat_N))
    columns_BC = torch.zeros(n_rows * most, dtype=torch.long, device=values_BF.device)
    columns_BC.scatter_(0, place_N, flat_N - rows_N * width)
    top_BM, position_BM = candidates_BC.view(n_rows, most).topk(m, dim=1, sorted=False)
    return top_BM, columns_BC.view(n_rows, most).gather(1, position_BM)


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
        return _sorted_by_latent(*top_per_row(product_BF, k))
    idx = top_per_row(product_BF, k)[1].sort(dim=1).values
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
    rows = Rows.uniform(idx_BK)
    return gather_dot(rows, x_BD, w_enc_FD).view(idx_BK.shape) + b_enc_F[idx_BK]


KeepRule = Callable[[Tensor], Tensor]
"""Given a batch's (B, F) pre-activations (or the product that ranks them), the positions of
those to keep in the flattened matrix, ascending."""


@torch.no_grad()
def kept_preacts(
    x_BD: Tensor,
    w_enc_FD: Tensor,
    b_enc_F: Tensor,
    keep: KeepRule,
    precision: SelectionPrecision,
) -> tuple[Tensor, Rows]:
    """Pre-activations kept by a rule that may keep a different number per token (BatchTopK's
    batch-wide top B·k, or a threshold), flat: (values_N, Rows), latents ascending per token.

    The rule sees the whole (B, F) product, so the kept set is exact whoever keeps how many;
    reading it off a mask costs a pass over the product, as TopK's per-token top k does.
    """
    product_BF = selection_product(x_BD, w_enc_FD, b_enc_F, precision)
    kept_N = keep(product_BF)
    rows = Rows.from_flat(kept_N, *product_BF.shape)
    if precision == "float32":
        return product_BF.view(-1).index_select(0, kept_N), rows
    return gather_dot(rows, x_BD, w_enc_FD) + b_enc_F.index_select(0, rows.idx), rows


def padded(values_N: Tensor, rows: Rows) -> tuple[Tensor, Tensor]:
    """Flat codes as (B, K') tensors, K' the most latents any token keeps: a token that keeps
    fewer fills its row with latents it does not keep (the smallest such), of value 0, so every
    row's indices are distinct and ascending."""
    counts = rows.crow.diff()
    most = max(int(counts.max()), 1) if rows.n_tokens else 1
    tokens = rows.token_of_entry()
    slot = torch.arange(len(rows.idx), device=rows.idx.device) - rows.crow[tokens]
    small_kept = torch.zeros(rows.n_tokens, most, dtype=torch.bool, device=rows.idx.device)
    small = rows.idx < most
    small_kept[tokens[small], rows.idx[small]] = True
    free = (~small_kept).to(torch.uint8).argsort(dim=1, descending=True, stable=True)
    pad_slot = torch.arange(most, device=rows.idx.device) - counts[:, None]
    idx_BK = free.gather(1, pad_slot.clamp(min=0))
    idx_BK[tokens, slot] = rows.idx
    values_BK = values_N.new_zeros(rows.n_tokens, most)
    values_BK[tokens, slot] = values_N
    return _sorted_by_latent(values_BK, idx_BK)


def _sorted_by_latent(values: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    idx, order = idx.sort(dim=1)
    return values.gather(1, order), idx


class SparseEncode(torch.autograd.Function):
    """z_N = relu(pre-activations at the rows' entries), or the raw values when `relu` is False;
    gradients only at those entries."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_BD: Tensor,
        w_enc_FD: Tensor,
        b_enc_F: Tensor,
        preacts_N: Tensor,
        rows: Rows,
        relu: bool,
        kernels: Kernels = Kernels(),
    ) -> Tensor:
        ctx.save_for_backward(x_BD, w_enc_FD, preacts_N)
        ctx.rows, ctx.relu, ctx.kernels = rows, relu, kernels
        return preacts_N.clamp_min(0) if relu else preacts_N.clone()

    @staticmethod
    def backward(ctx: Any, grad_z_N: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x_BD, w_enc_FD, preacts_N = ctx.saved_tensors
        rows: Rows = ctx.rows
        grad_pre_N = grad_z_N * (preacts_N > 0) if ctx.relu else grad_z_N
        n_latents = w_enc_FD.shape[0]
        grad_x = gather_sum(rows, grad_pre_N, w_enc_FD) if ctx.needs_input_grad[0] else None
        grad_w = scatter_outer(rows, grad_pre_N, x_BD, n_latents, ctx.kernels.scatter_outer)
        grad_b = torch.zeros(n_latents, device=x_BD.device, dtype=grad_pre_N.dtype)
        grad_b.index_add_(0, rows.idx, grad_pre_N)
        return grad_x, grad_w, grad_b, None, None, None, None


class SparseDecode(torch.autograd.Function):
    """x̂_BD = Σ_n z_n W_dec[idx_n] over each token's entries, without b_pre."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, z_N: Tensor, rows: Rows, w_dec_FD: Tensor, kernels: Kernels = Kernels()
    ) -> Tensor:
        ctx.save_for_backward(z_N, w_dec_FD)
        ctx.rows, ctx.kernels = rows, kernels
        return gather_sum(rows, z_N, w_dec_FD)

    @staticmethod
    def backward(ctx: Any, grad_out_BD: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        z_N, w_dec_FD = ctx.saved_tensors
        rows: Rows = ctx.rows
        kernels: Kernels = ctx.kernels
        grad_z = gather_dot(rows, grad_out_BD, w_dec_FD, kernels.gather_dot)
        grad_w = scatter_outer(rows, z_N, grad_out_BD, w_dec_FD.shape[0], kernels.scatter_outer)
        return grad_z, None, grad_w, None
