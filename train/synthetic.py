"""Synthetic activations with known ground truth: the planted-feature benchmark (bench/planted.py)
and test measure how many known directions a trainer recovers from them.

Each token is a constant mean offset (ViT residual streams have a large one), plus a sum of
planted unit directions, each firing independently with a Zipf probability
p ~ 1 / (rank + 10)^exponent with lognormal magnitudes, plus small isotropic noise. Everything
follows from seeds; the offset, the noise and the exponent are knobs, so that the benchmark can
run several worlds and a recipe tuned to one of them cannot pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PlantedWorld:
    """The ground truth: F unit directions in D dimensions, how often each fires, the offset."""

    dirs_FD: Tensor
    p_F: Tensor
    """Firing probability of each direction, most frequent first."""
    offset_D: Tensor
    noise_std: float

    @property
    def d_in(self) -> int:
        return self.dirs_FD.shape[1]


def planted_world(
    n_features: int,
    d_in: int,
    seed: int,
    active: float = 16,
    offset_ratio: float = 2.0,
    noise_ratio: float = 0.1,
    zipf_exponent: float = 1.0,
) -> PlantedWorld:
    """`active` directions fire per token on average; the offset's norm is `offset_ratio` times
    the signal's RMS norm, the noise's `noise_ratio` times it. Seed it apart from the SAE's own
    initialisation (TopKSAE(seed=s) draws its rows as randn with seed s)."""
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1))
    dirs_FD = torch.randn(n_features, d_in, generator=g)
    dirs_FD /= dirs_FD.norm(dim=1, keepdim=True)
    p_F = (torch.arange(1, n_features + 1) + 10.0) ** -zipf_exponent
    p_F *= active / p_F.sum()
    signal_rms = math.sqrt(active * math.e)  # E|signal|^2 = sum p * E[m^2], m = exp(N(0, 1/2))
    offset_D = torch.randn(d_in, generator=g)
    offset_D *= offset_ratio * signal_rms / offset_D.norm()
    noise_std = noise_ratio * signal_rms / math.sqrt(d_in)
    return PlantedWorld(dirs_FD, p_F.clamp(max=1.0), offset_D, noise_std)


def planted_tokens(world: PlantedWorld, n_tokens: int, seed: int) -> tuple[Tensor, Tensor]:
    """(activations, noise) of `n_tokens` tokens, (N, D) each: activations minus noise are
    what the true codes reconstruct, so the noise alone is the best possible error."""
    g = torch.Generator().manual_seed(seed)
    n_features = len(world.p_F)
    acts, noises = [], []
    for start in range(0, n_tokens, 16384):
        n = min(16384, n_tokens - start)
        fired = (torch.rand(n, n_features, generator=g) < world.p_F).nonzero().T
        magnitudes = (0.5**0.5 * torch.randn(fired.shape[1], generator=g)).exp()
        codes = torch.sparse_coo_tensor(fired, magnitudes, (n, n_features), check_invariants=False)
        noise = world.noise_std * torch.randn(n, world.d_in, generator=g)
        acts.append(torch.sparse.mm(codes, world.dirs_FD) + world.offset_D + noise)
        noises.append(noise)
    return torch.cat(acts), torch.cat(noises)


@dataclass(frozen=True)
class Recovery:
    """How well a dictionary's rows match the planted directions."""

    mean_max_cosine: float
    """Mean over planted directions of the best cosine with any decoder row."""
    matched: float
    """Share of planted directions with a decoder row at cosine > 0.9."""
    rarest_quarter_matched: float
    """The same share among the quarter of directions that fire least often."""


MATCH_COSINE = 0.9


@torch.no_grad()
def recovery(world: PlantedWorld, decoder_FD: Tensor) -> Recovery:
    """Compare decoder rows (any norm) with the planted directions."""
    rows = decoder_FD.detach().float().cpu()
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    best = (world.dirs_FD @ rows.T).max(dim=1).values
    rarest = best[-len(best) // 4 :]
    return Recovery(
        mean_max_cosine=float(best.mean()),
        matched=float((best > MATCH_COSINE).float().mean()),
        rarest_quarter_matched=float((rarest > MATCH_COSINE).float().mean()),
    )
