"""BatchTopK's threshold θ against the batch rule it stands in for: the smallest kept activation
m of every training batch, and the inference L0 that θ would give at several running-mean rates.

Why: issue 23 found vitscope's BatchTopK SAEs inferring with L0 26-27 where k = 32. θ is a running
mean of m; if m drifts during training, a slow rate leaves θ behind and inference keeps fewer
(or more) latents than training did. One short run on a planted world records m step by step;
each rate's θ is then replayed from the same sequence and judged on held-out tokens.

    .venv/bin/python bench/threshold_lag.py --tokens 1048576
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import command_line, md_table, publish

from vitscope.saes.architectures.batchtopk import BatchTopKSAE
from vitscope.support.configs import load_config
from vitscope.train.config import TrainConfig
from vitscope.train.synthetic import planted_tokens, planted_world
from vitscope.train.trainer import new_member, train_step

RATES = (0.01, 0.05, 0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1_048_576)
    parser.add_argument("--d-in", type=int, default=128)
    parser.add_argument("--latents", type=int, default=2048)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench/results/threshold_lag.md"))
    args = parser.parse_args()
    world = planted_world(args.latents // 2, args.d_in, 3)
    x_ND, _ = planted_tokens(world, args.tokens, 5)
    heldout_ND, _ = planted_tokens(world, 16384, 6)
    cfg = load_config(
        TrainConfig,
        None,
        cache="(tensors)",
        tokens=args.tokens,
        n_latents=args.latents,
        k=args.k,
        batch_size=4096,
        device="cpu",
        architecture="batchtopk",
    )
    member = new_member(cfg, args.d_in, x_ND[:16384], torch.device("cpu"))
    smallest: list[float] = []
    update = BatchTopKSAE._update_threshold

    def recorded(sae: BatchTopKSAE, z_N: torch.Tensor) -> None:
        smallest.append(float(z_N.detach()[z_N > 0].min()))
        update(sae, z_N)

    BatchTopKSAE._update_threshold = recorded  # type: ignore[method-assign]
    for batch_BD in x_ND.split(4096):
        train_step(member, member.sae.training_inputs(batch_BD))
    sae = member.sae.eval()

    def inference_l0(threshold: float) -> float:
        sae.get_buffer("threshold").fill_(threshold)
        return float((sae.encode(heldout_ND).values > 0).sum(dim=-1).float().mean())

    rows = []
    for rate in RATES:
        theta = smallest[0]
        for m in smallest[1:]:
            theta += rate * (m - theta)
        rows.append(f"running mean, rate {rate} | {theta:.4f} | {inference_l0(theta):.2f}")
    rows.append(f"the last batch's m | {smallest[-1]:.4f} | {inference_l0(smallest[-1]):.2f}")
    trace = ", ".join(f"{m:.3f}" for m in smallest[:: max(1, len(smallest) // 12)])
    body = [
        f"BatchTopK, d_in {args.d_in}, {args.latents:,} latents, k = {args.k}, batch 4,096, "
        f"{len(smallest)} steps on a planted world ({args.latents // 2:,} directions); held-out "
        f"L0 over 16,384 tokens. m every {max(1, len(smallest) // 12)} steps: {trace}.",
        "",
        *md_table("θ | value | inference L0", rows),
    ]
    publish(args.out, torch.device("cpu"), command_line(), body)


if __name__ == "__main__":
    main()
