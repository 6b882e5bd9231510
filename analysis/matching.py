"""One-to-one matching of two SAEs' latents by the cosine of their decoder rows, for cross-seed
consistency (PW-MCC, arXiv 2505.20254: the mean cosine of the matched pairs).

Up to `EXACT_UP_TO` latents the matching is the exact Hungarian assignment on the dense cosine
matrix (scipy's `linear_sum_assignment`; at 8,192 latents 28 s and 1.7 GB on a shared 2-core CPU,
at 16,384 142 s and 5.7 GB). Above, the dense matrix (17 GB at 65,536) and the cubic solver are out
of reach, so the assignment is solved exactly on a sparse graph instead: each latent's `CANDIDATES`
most similar latents of the other SAE (both directions, from a blockwise product that never holds
the whole matrix), plus a greedy matching of those edges completed arbitrarily, which guarantees
that a full matching exists; scipy's `min_weight_full_bipartite_matching` (LAPJVsp) then finds the
best one. It is never worse than greedy, and equals the dense optimum whenever the optimum uses
only candidate edges; measured within 6e-4 of the optimal PW-MCC, 65,536 latents in under 8 minutes
and 1.8 GB on that CPU (BENCHMARKS.md, "cross-seed consistency").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

EXACT_UP_TO = 8192
"""Widths matched by the dense Hungarian assignment; wider ones by the sparse one."""
CANDIDATES = 8
"""Most similar latents of the other SAE kept per latent (each direction) for the sparse one."""
BLOCK_ROWS = 1024
"""Rows of the cosine matrix computed at a time (1,024 x 65,536 float32: 268 MB)."""
EXACT = "exact Hungarian (scipy linear_sum_assignment on the dense cosine matrix)"
SPARSE = (
    f"sparse Hungarian (scipy min_weight_full_bipartite_matching on each latent's top "
    f"{CANDIDATES} cosines both ways, plus a greedy completion)"
)


@dataclass(frozen=True)
class Matching:
    """Latent i of the first SAE is matched to latent `partner[i]` of the second."""

    partner: np.ndarray
    """(F,) int64: a permutation of the second SAE's latents."""
    cosine: np.ndarray
    """(F,) float64: the cosine of each matched pair of decoder rows."""
    method: str
    """EXACT or SPARSE."""

    @property
    def pw_mcc(self) -> float:
        """Mean cosine of the matched pairs (PW-MCC)."""
        return float(self.cosine.mean())

    def share_above(self, threshold: float) -> float:
        return float((self.cosine > threshold).mean())


def unit_rows(decoder_FD: Tensor) -> Tensor:
    """Decoder rows at unit norm, float32 (a zero row stays zero)."""
    return torch.nn.functional.normalize(decoder_FD.detach().float(), dim=1)


def match_decoders(decoder_a: Tensor, decoder_b: Tensor) -> Matching:
    """The one-to-one matching of two (F, D) decoders that maximises the summed cosine: exact up
    to EXACT_UP_TO latents, sparse above. The product runs on the decoders' device."""
    a, b = unit_rows(decoder_a), unit_rows(decoder_b)
    return exact_matching(a, b) if len(a) <= EXACT_UP_TO else sparse_matching(a, b)


def exact_matching(a: Tensor, b: Tensor) -> Matching:
    """Hungarian assignment on the dense cosine matrix of unit rows `a` and `b` (F, D)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment((a @ b.T).cpu().numpy(), maximize=True)
    partner = cols.astype(np.int64)
    return Matching(partner, pair_cosines(a, b, rows, partner), EXACT)


def sparse_matching(a: Tensor, b: Tensor, candidates: int = CANDIDATES) -> Matching:
    """The best one-to-one matching of unit rows `a` and `b` (F, D) among each latent's top
    `candidates` cosines both ways (and a greedy completion, so that one always exists)."""
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    n = len(a)
    rows, cols, cosines = candidate_edges(a, b, min(candidates, n))
    partner = greedy_matching(rows, cols, cosines, n)
    left = np.flatnonzero(partner < 0)
    free = np.setdiff1d(np.arange(n), partner[partner >= 0])  # as many as `left`, ascending
    rows = np.concatenate([rows, left])
    cols = np.concatenate([cols, free])
    cosines = np.concatenate([cosines, pair_cosines(a, b, left, free)])
    # Costs 2 - cosine lie in [1, 3]: nonzero, as the sparse solver requires of every edge.
    graph = csr_array((2.0 - cosines, (rows, cols)), shape=(n, n))
    _, matched = min_weight_full_bipartite_matching(graph)
    partner = matched.astype(np.int64)
    return Matching(partner, pair_cosines(a, b, np.arange(n), partner), SPARSE)


def candidate_edges(a: Tensor, b: Tensor, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, cosines), each edge once: every row's `m` best columns and every column's
    `m` best rows, from the cosine matrix computed BLOCK_ROWS rows at a time."""
    n_b = len(b)
    column_best = torch.full((m, n_b), -torch.inf, device=a.device)
    column_rows = torch.zeros((m, n_b), dtype=torch.long, device=a.device)
    rows, cols, cosines = [], [], []
    for start in range(0, len(a), BLOCK_ROWS):
        cosine_RF = a[start : start + BLOCK_ROWS] @ b.T
        best, best_cols = cosine_RF.topk(m, dim=1)
        block_rows = torch.arange(start, start + len(cosine_RF), device=a.device)
        rows.append(block_rows.repeat_interleave(m))
        cols.append(best_cols.flatten())
        cosines.append(best.flatten())
        top, top_rows = cosine_RF.topk(min(m, len(cosine_RF)), dim=0)
        merged = torch.cat([column_best, top])
        column_best, order = merged.topk(m, dim=0)
        column_rows = torch.cat([column_rows, top_rows + start]).gather(0, order)
    rows.append(column_rows.flatten())
    cols.append(torch.arange(n_b, device=a.device).repeat(m))
    cosines.append(column_best.flatten())
    edge_rows, edge_cols, edge_cosines = (torch.cat(x).cpu().numpy() for x in (rows, cols, cosines))
    _, first = np.unique(edge_rows.astype(np.int64) * n_b + edge_cols, return_index=True)
    return edge_rows[first], edge_cols[first], edge_cosines[first].astype(np.float64)


def greedy_matching(rows: np.ndarray, cols: np.ndarray, cosines: np.ndarray, n: int) -> np.ndarray:
    """(n,) partner of each row: edges taken best first while both ends are free; -1 for a row
    whose candidates were all taken."""
    partner = np.full(n, -1, dtype=np.int64)
    taken = np.zeros(n, dtype=bool)
    for edge in np.argsort(-cosines, kind="stable"):
        row, col = rows[edge], cols[edge]
        if partner[row] < 0 and not taken[col]:
            partner[row], taken[col] = col, True
    return partner


def pair_cosines(a: Tensor, b: Tensor, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """float64 cosine of each pair (a[rows[i]], b[cols[i]]) of unit rows, BLOCK_ROWS at a time."""
    out = np.empty(len(rows), dtype=np.float64)
    for start in range(0, len(rows), BLOCK_ROWS):
        pick = slice(start, start + BLOCK_ROWS)
        index_a = torch.as_tensor(rows[pick], device=a.device)
        index_b = torch.as_tensor(cols[pick], device=b.device)
        pair = (a[index_a].double() * b[index_b].double()).sum(dim=1)
        out[pick] = pair.cpu().numpy()
    return out
