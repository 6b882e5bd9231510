"""One SAE training step, sparse paths against a straightforward dense implementation and
against one bfloat16 encoder product of the same shape, for each architecture.

Why: issue 4 asks the sparse decoder and sparse encoder gradient to make a step at d=1024,
65,536 latents, k=32, 4,096 tokens at least 5x faster than the dense computation on a CPU, with
the same gradients; issue 12 asks a GPU step within 3x of one bfloat16 product (B x D) @ (D x F),
with no slowdown over repeated steps (the first and last fifth of the steps are compared). Both
paths are the same `TopKSAE` (`autoencode(x, dense=True)` is the plain PyTorch version: dense
top-k scattered into a (B, F) matrix, dense decoder product, autograd); the sparse one runs with
each selection precision. BatchTopK and Matryoshka (issue 23) take the sparse path, flat, with
the selection TrainConfig's "auto" gives the device (bfloat16 on a GPU).

    .venv/bin/python bench/train_step.py                  # CPU, full configuration
    python bench/train_step.py --device cuda              # GPU
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial
from pathlib import Path

import torch
from common import command_line, publish, timed

from vitscope.saes.architectures import build_sae
from vitscope.saes.card import SAECard
from vitscope.saes.kernels import SelectionPrecision
from vitscope.saes.sae import SAE, losses
from vitscope.train.config import TrainConfig
from vitscope.train.trainer import new_adam


def make_step(sae: SAE, dense: bool, dead_F: torch.Tensor | None, k_aux: int):
    optimizer = new_adam(sae.parameters(), lr=1e-4, eps=6.25e-10)

    def step(x_BD: torch.Tensor) -> torch.Tensor:
        out = sae.autoencode(x_BD, dead_F, k_aux, dense)
        terms = losses(sae, out, x_BD)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        sae.remove_parallel_decoder_grad()
        optimizer.step()
        sae.normalize_decoder()
        return terms["loss"].detach()

    return step


def bench_sae(
    args: argparse.Namespace, architecture: str = "topk", selection: SelectionPrecision = "float32"
) -> SAE:
    """The benchmark's SAE of `architecture`, seed 0, with the options `vitscope train` gives it
    (the batch rules' floor keys, Matryoshka's prefixes 1/16 and 1/4)."""
    cfg = TrainConfig(
        cache="(tensors)", layer=0, architecture=architecture, k=args.k, n_latents=args.latents
    )
    return build_sae(SAECard(args.d, args.latents, cfg.sae_options()), selection=selection)


def time_steps(step, batches: list[torch.Tensor], repeats: int) -> list[float]:
    """Seconds of each of `repeats` steps, cycling through `batches`, after one warm-up step."""
    step(batches[0])  # warm-up: allocations, kernel choice
    device = batches[0].device
    return [timed(partial(step, batches[i % len(batches)]), device).wall for i in range(repeats)]


def product_seconds(x_BD: torch.Tensor, w_FD: torch.Tensor, repeats: int) -> list[float]:
    """One bfloat16 encoder product, the floor a step is measured against."""
    x_bf, w_bf = x_BD.bfloat16(), w_FD.bfloat16()
    return time_steps(lambda x: x @ w_bf.T, [x_bf], repeats)


def gradient_agreement(args: argparse.Namespace, x_BD: torch.Tensor, dead_F) -> float:
    """Largest relative difference between the two paths' gradients, parameter by parameter."""
    grads = {}
    for dense in (True, False):
        sae = bench_sae(args).to(x_BD.device)
        out = sae.autoencode(x_BD, dead_F, args.k_aux, dense)
        losses(sae, out, x_BD)["loss"].backward()
        grads[dense] = {name: p.grad for name, p in sae.named_parameters()}
    return max(
        float((grads[False][name] - grad).norm() / grad.norm().clamp_min(1e-30))
        for name, grad in grads[True].items()
    )


def step_parser(doc: str | None) -> argparse.ArgumentParser:
    """The step's shape and device, as this script and bench/step_profile.py take them."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--latents", type=int, default=65536)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--k-aux", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dead", type=float, default=0.0, help="share of latents marked dead")
    return parser


def dead_latents(args: argparse.Namespace, device: torch.device) -> torch.Tensor | None:
    """A seeded `--dead` share of the latents marked dead (AuxK then runs), or None."""
    if not args.dead:
        return None
    dead_F = torch.rand(args.latents, generator=torch.Generator().manual_seed(1)) < args.dead
    return dead_F.to(device)


def main() -> None:
    parser = step_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=8, help="distinct batches cycled")
    parser.add_argument("--out", type=Path, default=Path("bench/results/train_step.md"))
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(args.batch, args.d, generator=generator) / args.d**0.5).to(device)
        for _ in range(args.batches)
    ]
    dead_F = dead_latents(args, device)
    error = gradient_agreement(args, batches[0], dead_F)
    floor = bench_sae(args).w_enc.detach().to(device)
    timings = {"bfloat16 encoder product": product_seconds(batches[0], floor, args.repeats)}
    auto = "bfloat16" if device.type == "cuda" else "float32"  # TrainConfig's selection "auto"
    paths = [
        ("sparse, float32 selection", False, "float32", "topk"),
        ("dense", True, "float32", "topk"),
    ]
    paths += [("sparse, bfloat16 selection", False, "bfloat16", "topk")]
    paths += [
        (f"{name}, {auto} selection", False, auto, name) for name in ("batchtopk", "matryoshka")
    ]
    paths += [paths[0]]  # drift check
    for name, dense, selection, architecture in paths:
        sae = bench_sae(args, architecture, selection)
        step = make_step(sae.to(device), dense, dead_F, args.k_aux)
        times = time_steps(step, batches, args.repeats)
        timings.setdefault(name, []).extend(times)
    base = statistics.median(timings["bfloat16 encoder product"])
    fifth = max(1, args.repeats // 5)
    speedup = statistics.median(timings["dense"]) / statistics.median(timings[paths[0][0]])
    body = [
        "| path | median (s) | tokens/s | of one bf16 product | last / first fifth of steps |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {name} | {statistics.median(t):.4f} | {args.batch / statistics.median(t):,.0f} "
            f"| {statistics.median(t) / base:.1f}x "
            f"| {statistics.median(t[-fifth:]) / statistics.median(t[:fifth]):.2f} |"
            for name, t in timings.items()
        ),
        "",
        f"Speed-up sparse (float32 selection) over dense: **{speedup:.1f}x**; "
        f"largest relative gradient difference between the paths: {error:.1e}.",
    ]
    command = command_line()
    publish(args.out, device, command, body)


if __name__ == "__main__":
    main()
