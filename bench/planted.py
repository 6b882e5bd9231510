"""Planted features: how many known directions vitscope's TopK trainer and SAELens' recover from
the same synthetic tokens, in the same batches and order, in one run.

Each token is a constant mean offset (twice the signal's RMS norm) plus a sum of planted unit
directions, each firing independently with a Zipf probability (p ~ 1 / (rank + 10), ~16 active
per token), with lognormal magnitudes, plus small isotropic noise. Every trainer reads the
batches of `tensor_batches(train, batch, seed)`; vitscope is also trained through its real path
(the tokens written as a cache on disk, read by its shuffling loader, `train([TrainConfig])`),
which sees the same tokens in its own order.

    .venv/bin/python bench/planted.py
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import publish, write_single_shard_cache

from vitscope.pipeline.model import import_open_clip
from vitscope.train.config import TrainConfig
from vitscope.train.kernels import bfloat16_is_faster
from vitscope.train.loader import tensor_batches
from vitscope.train.run import INIT_SAMPLE_TOKENS, train
from vitscope.train.sae_folder import load_sae_folder
from vitscope.train.trainer import fit, new_member

os.environ.setdefault("WANDB_MODE", "disabled")
import_open_clip()  # sae_lens imports transformers, which imports torchvision: the CPU-torch fix
import sae_lens  # noqa: E402
from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402
from sae_lens.config import SAETrainerConfig  # noqa: E402

D = 256
TOKENS_PER_IMAGE = 256
"""How the training tokens are laid out as "images" in the on-disk cache (16 per chunk)."""


def planted_data(n_features: int, seed: int) -> dict[str, torch.Tensor]:
    """Directions, firing probabilities, offset and noise level from `seed` (never the seed of
    an SAE's own initialisation: vitscope's TopKSAE(seed=0) draws its rows as randn with seed 0)."""
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1))
    dirs_FD = torch.randn(n_features, D, generator=g)
    dirs_FD /= dirs_FD.norm(dim=1, keepdim=True)
    p_F = 1 / (torch.arange(1, n_features + 1) + 10.0)
    p_F *= 16 / p_F.sum()
    signal_rms = math.sqrt(16 * math.e)  # E|signal|^2 = sum p * E[m^2], m = exp(N(0, 1/2))
    offset_D = torch.randn(D, generator=g)
    offset_D *= 2 * signal_rms / offset_D.norm()
    noise_std = 0.1 * signal_rms / math.sqrt(D)
    return dict(dirs_FD=dirs_FD, p_F=p_F, offset_D=offset_D, noise_std=torch.tensor(noise_std))


def tokens(world: dict, n_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations, noise) of `n_tokens` tokens; activations minus noise are the true codes'
    reconstruction."""
    g = torch.Generator().manual_seed(seed)
    acts, noises = [], []
    for start in range(0, n_tokens, 16384):
        n = min(16384, n_tokens - start)
        fired = (torch.rand(n, len(world["p_F"]), generator=g) < world["p_F"]).nonzero().T
        mags = (0.5**0.5 * torch.randn(fired.shape[1], generator=g)).exp()
        codes = torch.sparse_coo_tensor(fired, mags, (n, len(world["p_F"])), check_invariants=False)
        noise = world["noise_std"] * torch.randn(n, D, generator=g)
        acts.append(torch.sparse.mm(codes, world["dirs_FD"]) + world["offset_D"] + noise)
        noises.append(noise)
    return torch.cat(acts), torch.cat(noises)


def write_cache(path: Path, acts_ND: torch.Tensor) -> Path:
    """The training tokens through the real cache writer, as images of 256 tokens, one shard."""
    n_images, chunk_images = len(acts_ND) // TOKENS_PER_IMAGE, 16
    images = acts_ND[: n_images * TOKENS_PER_IMAGE].view(n_images, TOKENS_PER_IMAGE, D)
    chunks = images.split(chunk_images)
    return write_single_shard_cache(path, chunks, n_images, chunk_images, 0, "float32")


@torch.no_grad()
def scores(decoder_FD, autoencode, world, heldout_ND, rate) -> list[str]:
    """One table row's numbers: tokens/s, recovery of the planted directions, held-out quality."""
    decoder = decoder_FD / decoder_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)
    best = (world["dirs_FD"] @ decoder.T).max(dim=1).values
    rare = best[-len(best) // 4 :]  # the lowest firing probabilities
    error, fired = 0.0, torch.zeros(len(decoder), dtype=torch.bool)
    l0 = 0.0
    for x in heldout_ND.split(4096):
        recon, z = autoencode(x)
        error += float((recon - x).double().pow(2).sum())
        fired |= (z > 0).any(dim=0)
        l0 += float((z > 0).sum())
    variance = float((heldout_ND - heldout_ND.mean(dim=0)).double().pow(2).sum())
    return [
        f"{rate:,.0f}",
        f"{best.mean():.3f}",
        f"{(best > 0.9).float().mean():.1%}",
        f"{(rare > 0.9).float().mean():.1%}",
        f"{error / variance:.4f}",
        f"{1 - fired.float().mean():.1%}",
        f"{l0 / len(heldout_ND):.1f}",
    ]


def saelens_run(args, world, train_ND, heldout_ND, b_dec_at_mean: bool) -> list[str]:
    """SAELens' TopK SAE and SAETrainer with their defaults (k and width set), lr_end = lr."""
    torch.manual_seed(args.seed)  # SAELens initialises from the global generator
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=args.latents, k=args.k))
    if b_dec_at_mean:
        sample = torch.cat([b.acts_BD for b in _first(train_ND, args)])
        sae.b_dec.data.copy_(sample.mean(dim=0))
    cfg = SAETrainerConfig(
        total_training_samples=args.tokens,
        train_batch_size_samples=args.batch,
        lr_end=SAETrainerConfig.lr,  # required; the default schedule is constant
    )
    provider = (b.acts_BD for b in tensor_batches(train_ND, args.batch, seed=args.seed))
    start = time.perf_counter()
    SAETrainer(cfg, sae, provider).fit()
    rate = cfg.total_training_samples / (time.perf_counter() - start)
    sae.eval()
    return scores(sae.W_dec, lambda x: _saelens(sae, x), world, heldout_ND, rate)


def vitscope_cfg(args, **fields) -> TrainConfig:
    """vitscope's documented defaults; only the sizes of this benchmark are set."""
    return TrainConfig(
        tokens=args.tokens,
        n_latents=args.latents,
        k=args.k,
        batch_size=args.batch,
        device="cpu",
        **fields,
    )


def vitscope_tensor_run(args, world, train_ND, heldout_ND, work: Path) -> list[str]:
    """vitscope's trainer (`fit`) on the very batches SAELens gets, initialised as `train` does
    (on the first INIT_SAMPLE_TOKENS tokens of the stream)."""
    cfg = vitscope_cfg(args, cache="(tensor)", layer=0, out=str(work / "tensor-run"))
    first = _first(train_ND, args)
    member = new_member(cfg, D, torch.cat([b.acts_BD for b in first]), torch.device("cpu"))
    batches = tensor_batches(train_ND, args.batch, seed=args.seed)
    bfloat16_is_faster(torch.device("cpu"))  # the once-per-process probe, outside the clock
    start = time.perf_counter()
    fit([member], batches, heldout_ND[:4096].view(16, TOKENS_PER_IMAGE, D), slice(None))
    rate = cfg.tokens / (time.perf_counter() - start)
    sae = member.sae.eval()
    return scores(sae.w_dec, lambda x: _vitscope(sae, x), world, heldout_ND, rate)


def vitscope_cache_run(args, world, train_ND, heldout_ND, work: Path) -> list[str]:
    """The real path: cache on disk, loader, `train([TrainConfig])`; one chunk (16 images) held
    out by the loader, so its epoch is 4,096 tokens short and the run wraps into epoch two."""
    cache = write_cache(work / "cache", train_ND)
    cfg = vitscope_cfg(
        args, cache=str(cache), layer=0, out=str(work / "cache-run"), heldout_fraction=1e-9
    )
    start = time.perf_counter()
    (run_dir,) = train([cfg])
    rate = cfg.tokens / (time.perf_counter() - start)
    sae = load_sae_folder(run_dir)
    sae.eval()
    return scores(sae.w_dec, lambda x: _vitscope(sae, x), world, heldout_ND, rate)


def _saelens(sae, x):
    z = sae.encode(x)
    return sae.decode(z), z


def _vitscope(sae, x):
    codes = sae.encode(x)
    return sae.decode(codes), codes.dense()


def _first(train_ND, args):
    batches = tensor_batches(train_ND, args.batch, seed=args.seed)
    return [next(batches) for _ in range(-(-INIT_SAMPLE_TOKENS // args.batch))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", type=int, default=2048, help="planted directions")
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=786_432, help="training tokens")
    parser.add_argument("--heldout", type=int, default=65_536, help="held-out tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/planted.md"))
    args = parser.parse_args()
    args.tokens -= args.tokens % (16 * TOKENS_PER_IMAGE)  # whole cache chunks
    started = time.perf_counter()
    world = planted_data(args.features, args.seed)
    train_ND, _ = tokens(world, args.tokens, 1_000_003 * (args.seed + 1) + 1)
    heldout_ND, noise_ND = tokens(world, args.heldout, 1_000_003 * (args.seed + 1) + 2)
    variance = (heldout_ND - heldout_ND.mean(dim=0)).double().pow(2).sum()
    floor = float(noise_ND.double().pow(2).sum() / variance)
    work = Path(tempfile.mkdtemp(prefix="planted-bench-"))
    try:
        runs = {
            f"SAELens {sae_lens.__version__} TopK, defaults": lambda: saelens_run(
                args, world, train_ND, heldout_ND, False
            ),
            f"SAELens {sae_lens.__version__} TopK, b_dec at data mean": lambda: saelens_run(
                args, world, train_ND, heldout_ND, True
            ),
            "vitscope fit, same batches": lambda: vitscope_tensor_run(
                args, world, train_ND, heldout_ND, work
            ),
            "vitscope train, real cache + loader": lambda: vitscope_cache_run(
                args, world, train_ND, heldout_ND, work
            ),
        }
        rows = [
            "| trainer | tokens/s | mean max cos | matched > 0.9 | rarest quarter > 0.9 | "
            "held-out FVU | never fire | L0 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, run in runs.items():
            rows.append(f"| {name} | " + " | ".join(run()) + " |")
            print(rows[-1], file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    p = world["p_F"]
    body = [
        f"{args.features:,} planted directions in d_in = {D}, firing p = {p[0]:.3g} .. {p[-1]:.2g}"
        f" (Zipf, {p.sum():.0f} active per token on average), lognormal magnitudes, mean offset "
        f"2x the signal's RMS norm; {args.tokens:,} training tokens, {args.heldout:,} held out. "
        f"SAEs: {args.latents:,} latents, k = {args.k}, batch {args.batch}, torch threads "
        f"{torch.get_num_threads()}. Noise floor (held-out FVU of the true codes): {floor:.4f}. "
        f"Whole run {time.perf_counter() - started:,.0f} s.",
        "",
        *rows,
    ]
    command = "python bench/planted.py " + " ".join(sys.argv[1:])
    publish(args.out, torch.device("cpu"), command.strip(), body)


if __name__ == "__main__":
    main()
