"""AuxK's reconstruction, sparse against dense over the dead latents, at several dead shares.

Why: on the H200 a training step with a quarter of 65,536 latents dead took 0.10 s against
0.013 s with none (BENCHMARKS.md): AuxK's sparse path gathers and scatters B·k_aux·D floats
(k_aux = 512). Dense products over the dead columns do 4·B·D·F_dead multiply-adds at the
machine's peak instead. This times both (forward and backward of AuxK's loss, nothing else),
alternating, and reports where the dense route stops paying: `saes/aux.py` AUX_DENSE_SPAN.

    .venv/bin/python bench/aux_recon.py --d 256 --latents 4096 --k-aux 128     # CPU
    python bench/aux_recon.py --device cuda                                      # GPU
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial
from pathlib import Path

import torch
from common import alternate, command_line, md_table, publish, timed

from vitscope.saes.aux import AUX_RECON
from vitscope.saes.kernels import Kernels


def aux_pass(impl: str, tensors: tuple, dead_F: torch.Tensor, k_aux: int) -> None:
    """AuxK's reconstruction, its squared error against the input, and the backward pass."""
    x_BD, w_enc, b_enc, w_dec = tensors
    for p in (w_enc, b_enc, w_dec):
        p.grad = None
    dead_idx = dead_F.nonzero().squeeze(1)
    k = min(k_aux, len(dead_idx))
    recon = AUX_RECON[impl](x_BD, w_enc, b_enc, w_dec, dead_idx, k, Kernels())
    (recon - x_BD).pow(2).sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--latents", type=int, default=65536)
    parser.add_argument("--k-aux", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dead", default="0.01,0.05,0.25,1.0", help="shares of latents dead")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/aux_recon.md"))
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    x_BD = (torch.randn(args.batch, args.d, generator=generator) / args.d**0.5).to(device)
    w_dec = torch.randn(args.latents, args.d, generator=generator)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    tensors = (
        x_BD,
        w_dec.clone().to(device).requires_grad_(),
        torch.zeros(args.latents, device=device).requires_grad_(),
        w_dec.to(device).requires_grad_(),
    )
    rows = []
    for share in map(float, args.dead.split(",")):
        dead_F = (torch.rand(args.latents, generator=generator) < share).to(device)
        n_dead = int(dead_F.sum())
        runs = {
            impl: partial(timed, partial(aux_pass, impl, tensors, dead_F, args.k_aux), device)
            for impl in AUX_RECON
        }
        for run in runs.values():
            run()  # warm-up: allocations, kernel choice
        rounds = alternate(runs, args.repeats)
        sparse, dense = (statistics.median(t.wall for t in rounds.timings[i]) for i in AUX_RECON)
        rows.append(
            f"{share:g} | {n_dead:,} | {n_dead / args.k_aux:.1f} | {sparse * 1e3:.1f} "
            f"| {dense * 1e3:.1f} | {sparse / dense:.2f}"
        )
    body = [
        f"{args.batch:,} tokens, d {args.d}, {args.latents:,} latents, k_aux {args.k_aux}; "
        f"median of {args.repeats} alternating rounds; ratio = sparse / dense; "
        "AuxK's forward and backward only.",
        "",
        *md_table(
            "dead share | F_dead | F_dead / k_aux | sparse ms | dense over dead ms | ratio",
            rows,
        ),
    ]
    publish(args.out, device, command_line(), body)


if __name__ == "__main__":
    main()
