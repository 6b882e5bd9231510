"""Planted features: how many known directions vitscope and SAELens recover from the same
synthetic tokens (train/synthetic.py), in the same batches and order, in one run.

SAELens' TopK SAE is trained by its own SAETrainer, with its decoder bias at the data mean (and
at its defaults), and so are its BatchTopK and Matryoshka-BatchTopK SAEs (evaluated as the
JumpReLU SAEs it saves for them), each at the best learning rate of a grid (`--lrs`); vitscope's
trainer (`fit`) gets the very same tensor batches, with its documented defaults, with CLIP-Scope's
preset, with each architecture and with any `--variant` of settings; vitscope is also trained
through its real path (the tokens written as a cache on disk, read by its shuffling loader,
`train([TrainConfig])`), which sees the same tokens in its own order. Several worlds
(`--worlds`, WORLDS) move one knob each of the synthetic data, so a recipe tuned to one fails.

    .venv/bin/python bench/planted.py --worlds base,offset,noisy,crowded,steep
    .venv/bin/python bench/planted.py --runs fit --variant lr=1e-3 --variant k_aux=128
    .venv/bin/python bench/planted.py --runs saelens-batchtopk,saelens-matryoshka,batchtopk,\
matryoshka
    .venv/bin/python bench/planted.py --runs fit --outliers 0.01:30 \
        --variant exclude_outlier_tokens=5
    .venv/bin/python bench/planted.py --runs fit,batchtopk,matryoshka --lockstep

Rows trained one after another in one process are not measured alike: the host drifts, and the
allocator's history favours later rows (Matryoshka at 0.92x and 0.79x TopK's tokens/s by the
order alone, BENCHMARKS.md). `--lockstep` trains the vitscope fit rows together instead, every
batch through each row's step in turn, each step timed alone: their tokens/s comes from their
own steps, under the same conditions. `--as-command` first sets the allocator as `vitscope train`
does (support/memory.py).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from common import Timing, command_line, md_table, publish, timed, write_single_shard_cache

from vitscope.cache_spec.outliers import OUTLIER_RATIO
from vitscope.pipeline.model import import_open_clip
from vitscope.saes.folder import load_sae_folder
from vitscope.support.configs import load_config
from vitscope.support.memory import set_allocator_for
from vitscope.train.config import TrainConfig
from vitscope.train.loader import tensor_batches
from vitscope.train.outliers import TokenNorms
from vitscope.train.run import INIT_SAMPLE_TOKENS, train
from vitscope.train.synthetic import planted_tokens, planted_world, recovery
from vitscope.train.trainer import fit, new_member, train_step

os.environ.setdefault("WANDB_MODE", "disabled")
import_open_clip()  # sae_lens imports transformers, which imports torchvision: the CPU-torch fix
import sae_lens  # noqa: E402
from sae_lens import (  # noqa: E402
    SAE,
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
    SAETrainer,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.config import SAETrainerConfig  # noqa: E402

TOKENS_PER_IMAGE = 256
"""How the training tokens are laid out as "images" in the on-disk cache (16 per chunk)."""
RUNS = (
    "saelens",
    "saelens-mean",
    "fit",
    "fit-tuned",
    "clip-scope",
    "cache",
    "saelens-batchtopk",
    "saelens-matryoshka",
    "batchtopk",
    "matryoshka",
)
"""Rows `--runs` may name; SAELens' and the fit-tuned rows are tuned over `--lrs`."""
MATRYOSHKA_PREFIXES = (1 / 16, 1 / 4)
"""vitscope's default prefixes, given to SAELens' Matryoshka SAE as widths too."""


def scores(decoder_FD, autoencode, world, heldout_ND, timing, tokens) -> list[str]:
    """One table row's numbers: tokens/s, recovery of the planted directions, held-out quality
    on the ordinary tokens, others' CPU while it trained, and with outlier tokens among the
    held-out ones (`--outliers`) their FVU (against the ordinary tokens' mean); `autoencode(x)`
    returns (reconstruction, dense codes) in the activations' units."""
    found = recovery(world, decoder_FD)
    norms = heldout_ND.norm(dim=1)
    outlier_N = norms > OUTLIER_RATIO * norms.median()
    error_N = torch.zeros(len(heldout_ND), dtype=torch.float64)
    fired, l0 = torch.zeros(len(decoder_FD), dtype=torch.bool), 0.0
    with torch.no_grad():
        for first in range(0, len(heldout_ND), 4096):
            x = heldout_ND[first : first + 4096]
            recon, z = autoencode(x)
            error_N[first : first + len(x)] = (recon - x).double().pow(2).sum(dim=1)
            ordinary = ~outlier_N[first : first + len(x)]
            fired |= (z[ordinary] != 0).any(dim=0)
            l0 += float((z[ordinary] != 0).sum())
    ordinary_ND = heldout_ND[~outlier_N].double()
    mean_D = ordinary_ND.mean(dim=0)
    variance = float((ordinary_ND - mean_D).pow(2).sum())
    row = [
        f"{tokens / timing.wall:,.0f}",
        f"{found.mean_max_cosine:.3f}",
        f"{found.matched:.1%}",
        f"{found.rarest_quarter_matched:.1%}",
        f"{float(error_N[~outlier_N].sum()) / variance:.4f}",
        f"{1 - fired.float().mean():.1%}",
        f"{l0 / len(ordinary_ND):.1f}",
        f"{(timing.others or 0) / timing.wall:.2f}",
    ]
    if outlier_N.any():
        spread = float((heldout_ND[outlier_N].double() - mean_D).pow(2).sum())
        row.append(f"{float(error_N[outlier_N].sum()) / spread:.4f}")
    return row


def inject_outliers(acts_ND, fraction: float, scale: float, seed: int):
    """Register-like outlier tokens: a seeded `fraction` of the tokens get one fixed random
    direction added (the same for every world and split, as a ViT's massive activations sit in
    a few fixed dimensions), `scale` times the median token norm long, so that their norm is
    about `scale` times the median; returns the tokens and which were made outliers."""
    chosen_N = torch.rand(len(acts_ND), generator=torch.Generator().manual_seed(seed)) < fraction
    direction_D = torch.randn(acts_ND.shape[1], generator=torch.Generator().manual_seed(7))
    length = scale * float(acts_ND.norm(dim=1).median())
    acts_ND = acts_ND.clone()
    acts_ND[chosen_N] += length * direction_D / direction_D.norm()
    return acts_ND, chosen_N


def outliers(text: str) -> tuple[float, float]:
    """`0.01:30` -> (fraction, scale)."""
    fraction, scale = text.split(":")
    return float(fraction), float(scale)


def saelens_sae(args, architecture: str):
    """SAELens' training SAE of `architecture` with its defaults (k and width set; its AuxK weight
    `--peer-aux` when given)."""
    sizes = dict(d_in=args.d_in, d_sae=args.latents, k=args.k)
    if getattr(args, "peer_aux", None) is not None:
        sizes["aux_loss_coefficient"] = args.peer_aux
    if architecture == "matryoshka":
        widths = [round(f * args.latents) for f in MATRYOSHKA_PREFIXES] + [args.latents]
        cfg = MatryoshkaBatchTopKTrainingSAEConfig(**sizes, matryoshka_widths=widths)
        return MatryoshkaBatchTopKTrainingSAE(cfg)
    if architecture == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**sizes))
    return TopKTrainingSAE(TopKTrainingSAEConfig(**sizes))


def saelens_run(
    args,
    world,
    train_ND,
    heldout_ND,
    work: Path,
    b_dec_at_mean: bool,
    architecture: str = "topk",
    lr: float = SAETrainerConfig.lr,
    dead_feature_window: int = SAETrainerConfig.dead_feature_window,
) -> list[str]:
    """SAELens' SAE and SAETrainer with their defaults, lr_end = lr, its AuxK's dead window in
    steps; evaluated as the inference SAE it saves (TopK, or JumpReLU with the estimated
    threshold for the batch rules)."""
    torch.manual_seed(args.seed)  # SAELens initialises from the global generator
    sae = saelens_sae(args, architecture)
    if b_dec_at_mean:
        sae.b_dec.data.copy_(torch.cat([b.acts_BD for b in first_batches(train_ND, args)]).mean(0))
    cfg = SAETrainerConfig(
        total_training_samples=args.tokens,
        train_batch_size_samples=args.batch,
        lr=float(lr),
        lr_end=float(lr),  # required; the default schedule is constant
        dead_feature_window=int(dead_feature_window),
        lr_warm_up_steps=round(args.peer_warmup * args.tokens / args.batch),
    )
    provider = (b.acts_BD for b in tensor_batches(train_ND, args.batch, seed=args.seed))
    timing = timed(SAETrainer(cfg, sae, provider).fit)
    sae.save_inference_model(work / "saelens")
    inference = SAE.load_from_disk(str(work / "saelens")).eval()

    def autoencode(x):
        z = inference.encode(x)
        return inference.decode(z), z

    return scores(inference.W_dec, autoencode, world, heldout_ND, timing, args.tokens)


def vitscope_cfg(args, **settings) -> TrainConfig:
    """vitscope's documented defaults (or a preset), the benchmark's sizes, then `settings`."""
    sizes = dict(tokens=args.tokens, n_latents=args.latents, k=args.k, batch_size=args.batch)
    return load_config(TrainConfig, None, **sizes, device="cpu", layer=0, **settings)


def vitscope_fit_run(args, world, train_ND, heldout_ND, work: Path, **settings) -> list[str]:
    """vitscope's trainer (`fit`) on the very batches SAELens gets, initialised as `train` does
    (on the first INIT_SAMPLE_TOKENS tokens of the stream)."""
    cfg = vitscope_cfg(args, cache="(tensors)", out=str(work / "fit"), **settings)
    sample = torch.cat([b.acts_BD for b in first_batches(train_ND, args)])
    member = new_member(cfg, args.d_in, sample, torch.device("cpu"))
    batches = tensor_batches(train_ND, args.batch, seed=args.seed)
    heldout_NTD = heldout_ND[:4096].view(16, TOKENS_PER_IMAGE, args.d_in)
    timing = timed(lambda: fit([member], batches, heldout_NTD, slice(None)))
    shutil.rmtree(cfg.run_dir)
    return vitscope_scores(member.sae.eval(), world, heldout_ND, timing, args.tokens)


def vitscope_lockstep_runs(
    args, world, train_ND, heldout_ND, work: Path, rows: list[dict[str, str]]
) -> list[list[str]]:
    """fit's steps for several rows' settings at once: each batch of the stream goes through
    every row's `train_step` in turn (as `fit` trains a sweep), the first row changing every
    step, each step timed alone, so each row's tokens/s is its own steps' under the same host
    and allocator as the others'."""
    sample = torch.cat([b.acts_BD for b in first_batches(train_ND, args)])
    heldout_NTD = heldout_ND[:4096].view(16, TOKENS_PER_IMAGE, args.d_in)
    members = [
        new_member(
            vitscope_cfg(args, cache="(tensors)", out=str(work / f"lockstep{i}"), **settings),
            args.d_in,
            sample,
            torch.device("cpu"),
        )
        for i, settings in enumerate(rows)
    ]
    norms = [
        TokenNorms.of(heldout_NTD, slice(None), member.cfg.exclude_outlier_tokens)
        for member in members
    ]
    seconds = [0.0] * len(members)

    def steps() -> None:
        batches = tensor_batches(train_ND, args.batch, seed=args.seed)
        for step in range(-(-args.tokens // args.batch)):  # fit's steps to cfg.tokens
            acts_BD = next(batches).acts_BD.float()
            for turn in range(len(members)):  # each row first in turn (the order moved ratios 4%)
                i = (step + turn) % len(members)
                started = time.perf_counter()
                x_BD = norms[i].kept(acts_BD)
                member = members[i]
                train_step(member, member.sae.training_inputs(x_BD), consumed=len(acts_BD))
                seconds[i] += time.perf_counter() - started

    whole = timed(steps)
    share = None if whole.others is None else whole.others / whole.wall
    return [
        vitscope_scores(
            member.sae.eval(),
            world,
            heldout_ND,
            Timing(own, own, None if share is None else share * own, None),
            args.tokens,
        )
        for member, own in zip(members, seconds, strict=True)
    ]


def vitscope_cache_run(args, world, train_ND, heldout_ND, work: Path, **settings) -> list[str]:
    """The real path: cache on disk, loader, `train([TrainConfig])`; one chunk (16 images) held
    out by the loader, so its epoch is 4,096 tokens short and the run wraps into epoch two."""
    n_images = len(train_ND) // TOKENS_PER_IMAGE
    chunks = train_ND.view(n_images, TOKENS_PER_IMAGE, args.d_in).split(16)
    cache = write_single_shard_cache(work / "cache", chunks, n_images, 16, 0, "float32")
    cfg = vitscope_cfg(
        args, cache=str(cache), out=str(work / "train"), heldout_fraction=1e-9, **settings
    )
    timing = timed(lambda: train([cfg]))
    (run_dir,) = timing.result
    sae = load_sae_folder(run_dir).eval()
    return vitscope_scores(sae, world, heldout_ND, timing, args.tokens)


def vitscope_scores(sae, world, heldout_ND, timing, tokens) -> list[str]:
    def autoencode(x):
        codes = sae.encode(x)
        return sae.decode(codes), codes.dense()

    return scores(sae.w_dec, autoencode, world, heldout_ND, timing, tokens)


def first_batches(train_ND, args):
    """The stream's first batches, as many as `train` initialises a new SAE on."""
    batches = tensor_batches(train_ND, args.batch, seed=args.seed)
    return [next(batches) for _ in range(-(-INIT_SAMPLE_TOKENS // args.batch))]


def variant(text: str) -> dict[str, str]:
    """`lr=1e-3,k_aux=128` -> settings of TrainConfig (parsed and checked by load_config); a
    comma not followed by `name=` belongs to the value (`matryoshka_prefixes=0.25,0.5`)."""
    return dict(item.split("=", 1) for item in re.split(r",(?=\w+=)", text))


@dataclass(frozen=True)
class World:
    """One planted world: train/synthetic.py's knobs, and planted directions per latent."""

    offset: float = 2.0
    noise: float = 0.1
    zipf: float = 1.0
    features_per_latent: float = 0.5


WORLDS = {
    "base": World(),
    "offset": World(offset=8.0),
    "noisy": World(noise=0.3),
    "crowded": World(features_per_latent=1.0),
    "steep": World(zipf=1.3),
}
"""The worlds a recipe must win in: issue 11's, then one knob moved each (a mean offset 4x as
large, 3x the noise, as many planted directions as latents, a steeper Zipf law)."""

FIT_ROWS = {
    "fit": ("vitscope fit, defaults", {}),
    "clip-scope": ("vitscope fit, --preset clip-scope", {"preset": "clip-scope"}),
    **{
        name: (f"vitscope fit, --architecture {name}", {"architecture": name})
        for name in ("batchtopk", "matryoshka")
    },
}
"""The vitscope fit rows, untuned (`--lockstep` trains them together): label, settings."""

TUNED = ("saelens", "saelens-mean", "saelens-batchtopk", "saelens-matryoshka", "fit-tuned")
"""Rows trained once per point of their grid (`grid`); the table shows the best (most
directions matched, then the lowest held-out FVU) and names its settings."""


def trainers(data, work: Path) -> dict[str, tuple[str, Callable[..., list[str]]]]:
    """Every row this benchmark can train: name -> (label, run(**settings) -> numbers)."""
    peer = f"SAELens {sae_lens.__version__}"
    return {
        "saelens": (f"{peer} TopK, defaults", lambda **s: saelens_run(*data, work, False, **s)),
        "saelens-mean": (
            f"{peer} TopK, b_dec at data mean",
            lambda **s: saelens_run(*data, work, True, **s),
        ),
        "saelens-batchtopk": (
            f"{peer} BatchTopK, b_dec at data mean",
            lambda **s: saelens_run(*data, work, True, "batchtopk", **s),
        ),
        "saelens-matryoshka": (
            f"{peer} Matryoshka-BatchTopK, b_dec at data mean",
            lambda **s: saelens_run(*data, work, True, "matryoshka", **s),
        ),
        "fit-tuned": (
            "vitscope fit, defaults but lr",
            lambda **s: vitscope_fit_run(*data, work, **s),
        ),
        "cache": (
            "vitscope train, defaults, real cache + loader",
            lambda **s: vitscope_cache_run(*data, work, **s),
        ),
        **{
            name: (label, lambda fixed=fixed, **s: vitscope_fit_run(*data, work, **fixed, **s))
            for name, (label, fixed) in FIT_ROWS.items()
        },
    }


def grid(args, run: str) -> list[tuple[str, dict[str, str]]]:
    """A tuned row's settings to try: every `--lrs`, and for SAELens every `--peer-windows`
    (its AuxK dead window in steps: vitscope's is a share of the run, so the peer's is swept)."""
    windows = args.peer_windows.split(",") if run.startswith("saelens") else [""]
    return [
        (
            f"lr {lr}" + (f", window {window}" if window else ""),
            {"lr": lr, **({"dead_feature_window": window} if window else {})},
        )
        for lr in args.lrs.split(",")
        for window in windows
    ]


def best(rows: list[tuple[str, list[str]]]) -> tuple[str, list[str]]:
    """The setting whose row matched most planted directions (then lowest FVU)."""
    return max(rows, key=lambda row: (float(row[1][2].rstrip("%")), -float(row[1][4])))


def world_section(args, name: str, world_knobs: World, started: float) -> list[str]:
    """Train every chosen row on one world; its description, table and every tuning row."""
    features = round(args.latents * world_knobs.features_per_latent)
    world = planted_world(
        features,
        args.d_in,
        args.seed,
        offset_ratio=world_knobs.offset,
        noise_ratio=world_knobs.noise,
        zipf_exponent=world_knobs.zipf,
    )
    train_ND, _ = planted_tokens(world, args.tokens, 1_000_003 * (args.seed + 1) + 1)
    heldout_ND, noise_ND = planted_tokens(world, args.heldout, 1_000_003 * (args.seed + 1) + 2)
    variance = (heldout_ND - heldout_ND.mean(dim=0)).double().pow(2).sum()
    floor = float(noise_ND.double().pow(2).sum() / variance)
    injected = ""
    if args.outliers:
        fraction, scale = args.outliers
        train_ND, _ = inject_outliers(train_ND, fraction, scale, args.seed + 11)
        heldout_ND, _ = inject_outliers(heldout_ND, fraction, scale, args.seed + 12)
        injected = (
            f" Outlier tokens (`--outliers`): {fraction:.1%} of training and held-out tokens "
            f"with one fixed direction added at {scale:g}x the median token norm; FVU, unused "
            "latents and L0 are measured on the ordinary held-out tokens, outlier FVU on the "
            "injected ones."
        )
    work = Path(tempfile.mkdtemp(prefix="planted-bench-"))
    rows, tuning = [], []
    try:
        table = trainers((args, world, train_ND, heldout_ND), work)
        runs = list(filter(None, args.runs.split(",")))
        together = [run for run in runs if args.lockstep and run in FIT_ROWS]
        if together:
            settings = [FIT_ROWS[run][1] for run in together]
            numbers = vitscope_lockstep_runs(args, world, train_ND, heldout_ND, work, settings)
            stepped = dict(zip(together, numbers, strict=True))
        for run in runs:
            label, train_row = table[run]
            if run in together:
                rows.append(f"{label}, lockstep | " + " | ".join(stepped[run]))
            elif run in TUNED:
                tried = [(setting, train_row(**point)) for setting, point in grid(args, run)]
                tuning += [f"{label}, {setting} | " + " | ".join(row) for setting, row in tried]
                setting, numbers = best(tried)
                rows.append(f"{label}, best: {setting} | " + " | ".join(numbers))
            else:
                rows.append(f"{label} | " + " | ".join(train_row()))
            print(rows[-1], file=sys.stderr)
        for settings in args.variant:
            text = ", ".join(f"{k} {v}" for k, v in settings.items())
            numbers = vitscope_fit_run(args, world, train_ND, heldout_ND, work, **settings)
            rows.append(f"vitscope fit, {text} | " + " | ".join(numbers))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    p = world.p_F
    header = (
        "trainer | tokens/s | mean max cos | matched > 0.9 | rarest quarter > 0.9 | held-out FVU"
        " | latents unused | L0 | others' cores" + (" | outlier FVU" if args.outliers else "")
    )
    return [
        f"#### World `{name}`: {features:,} planted directions in d_in = {args.d_in}, firing p = "
        f"{p[0]:.3g} .. {p[-1]:.2g} (Zipf exponent {world_knobs.zipf}, {p.sum():.0f} active per "
        f"token on average), lognormal magnitudes, mean offset {world_knobs.offset}x and noise "
        f"{world_knobs.noise}x the signal's RMS norm. Noise floor (held-out FVU of the true "
        f"codes): {floor:.4f}.{injected} {time.perf_counter() - started:,.0f} s into the run.",
        "",
        *md_table(header, rows),
        "",
        *(tuning and ["Every setting tried (the best of each is above):", ""]),
        *(tuning and [*md_table(header, tuning), ""]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=3_014_656, help="training tokens")
    parser.add_argument("--heldout", type=int, default=65_536, help="held-out tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worlds", default="base", help=f"any of {','.join(WORLDS)}")
    parser.add_argument("--lrs", default="1e-3,2e-3,4e-3", help="the grid of the tuned rows")
    parser.add_argument(
        "--peer-windows", default="1000", help="SAELens' dead_feature_window grid (steps)"
    )
    parser.add_argument("--runs", default="saelens-mean,fit", help=f"any of {','.join(RUNS)}")
    parser.add_argument("--peer-aux", type=float, help="SAELens' aux_loss_coefficient (its: 1)")
    parser.add_argument(
        "--peer-warmup", type=float, default=0.0, help="SAELens' warm-up, a share of the steps"
    )
    parser.add_argument(
        "--variant", type=variant, action="append", default=[], help="a fit row: KEY=VALUE,..."
    )
    parser.add_argument(
        "--outliers",
        type=outliers,
        default=None,
        help="FRACTION:SCALE, e.g. 0.01:30: inject register-like high-norm tokens",
    )
    parser.add_argument(
        "--lockstep",
        action="store_true",
        help="train the vitscope fit rows together, each step timed alone (their pace)",
    )
    parser.add_argument(
        "--as-command", action="store_true", help="set the allocator as `vitscope train` does first"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/planted.md"))
    args = parser.parse_args()
    if args.as_command:
        set_allocator_for("train")
    args.tokens -= args.tokens % (16 * TOKENS_PER_IMAGE)  # whole cache chunks
    started = time.perf_counter()
    body = [
        f"SAEs: {args.latents:,} latents, k = {args.k}, batch {args.batch}, {args.tokens:,} "
        f"training tokens, {args.heldout:,} held out, torch threads {torch.get_num_threads()}; "
        f"tuned rows: the best of lr {args.lrs} (SAELens: and dead window "
        f"{args.peer_windows} steps)."
        + (" Fit rows in lockstep: tokens/s over each row's own steps." if args.lockstep else "")
        + (" Allocator set as `vitscope train` sets it." if args.as_command else ""),
        "",
    ]
    for name in args.worlds.split(","):
        body += world_section(args, name, WORLDS[name], started)
    body.append(f"Whole run {time.perf_counter() - started:,.0f} s.")
    publish(args.out, torch.device("cpu"), command_line(), body)


if __name__ == "__main__":
    main()
