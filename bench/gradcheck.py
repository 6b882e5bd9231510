"""How far each float32 path's gradients are from a float64 computation, at full size.

Why: at d=1024, 65,536 latents and k=32 the sparse and dense float32 gradients differ by ~3e-3;
this shows whether that is the sparse path's error or float32's (top-k near-ties flip).

    python bench/gradcheck.py --device cuda
"""

from __future__ import annotations

import argparse

import torch

from vitscope.saes.architectures import build_sae
from vitscope.saes.architectures.topk import TopKOptions
from vitscope.saes.card import SAECard
from vitscope.saes.sae import losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    d, n_latents, k, batch = 1024, 65536, 32, 4096
    x = torch.randn(batch, d, generator=torch.Generator().manual_seed(0)) / d**0.5
    x = x.to(args.device)
    grads = {}
    for name, dense, dtype in (
        ("dense float64", True, torch.float64),
        ("dense float32", True, torch.float32),
        ("sparse float32", False, torch.float32),
    ):
        sae = build_sae(SAECard(d, n_latents, TopKOptions(k=k))).to(args.device, dtype)
        losses(sae, sae.autoencode(x.to(dtype), dense=dense), x.to(dtype))["loss"].backward()
        grads[name] = {n: p.grad.double() for n, p in sae.named_parameters()}
    reference = grads.pop("dense float64")
    for name, found in grads.items():
        errors = {
            n: float((g - reference[n]).norm() / reference[n].norm()) for n, g in found.items()
        }
        print(name, "relative to float64:", {n: f"{e:.1e}" for n, e in errors.items()})


if __name__ == "__main__":
    main()
