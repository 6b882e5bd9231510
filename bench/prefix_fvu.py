"""How much Matryoshka's inner prefixes reconstruct alone: bench/planted.py, with every vitscope
row's held-out FVU of its first 128 and 512 latents and of the whole dictionary printed beside
it (for TopK the same cut, of latents in no order: the baseline a prefix should beat).

Why: a lower `prefix_weight` recovers more of the rarest planted directions (BENCHMARKS.md, issue
23); this measures what it costs the nested prefixes Matryoshka SAEs are trained for.

    .venv/bin/python bench/prefix_fvu.py --d-in 128 --latents 2048 --k 16 --tokens 2097152 \
        --worlds base --runs fit,matryoshka --variant architecture=matryoshka,prefix_weight=0.1
"""

from __future__ import annotations

import dataclasses
import sys

import planted
import torch

PREFIXES = (128, 512)
HELDOUT_TOKENS = 16_384


@torch.no_grad()
def prefix_fvus(sae, heldout_ND: torch.Tensor) -> list[float]:
    """Held-out FVU of the codes cut to each of PREFIXES latents, then of all of them."""
    x_ND = heldout_ND[:HELDOUT_TOKENS]
    codes = sae.encode(x_ND)
    total = (x_ND - x_ND.mean(dim=0)).pow(2).sum()
    fvus = []
    for m in (*PREFIXES, sae.n_latents):
        cut = dataclasses.replace(codes, values=torch.where(codes.indices < m, codes.values, 0))
        fvus.append(float((sae.decode(cut) - x_ND).pow(2).sum() / total))
    return fvus


def main() -> None:
    scores = planted.vitscope_scores

    def with_prefixes(sae, world, heldout_ND, timing, tokens):
        cuts = ", ".join(f"{v:.3f}" for v in prefix_fvus(sae, heldout_ND))
        weight = getattr(sae.card.options, "prefix_weight", None)
        name = f"{type(sae).__name__}" + (f", prefix weight {weight}" if weight else "")
        print(f"{name}: FVU of the first {PREFIXES} latents, all: {cuts}", flush=True)
        return scores(sae, world, heldout_ND, timing, tokens)

    planted.vitscope_scores = with_prefixes
    sys.argv[0] = "planted.py"
    planted.main()


if __name__ == "__main__":
    main()
