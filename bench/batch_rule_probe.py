"""Why the batch rules recover few planted directions: TopK, BatchTopK and Matryoshka on one small
planted world (train/synthetic.py), trained by `fit` at vitscope's defaults, from scratch and
from the planted dictionary itself, with what the trained SAE looks like inside.

Five questions, one row (or table) each:
- from scratch: how many directions each architecture recovers, and how its latents' firing
  rates and encoder norms spread (a batch rule ranks raw pre-activations across the batch, so a
  latent with a small encoder row may never be kept, and never get a gradient);
- `--warmup F`: BatchTopK that keeps by TopK's per-token rule for the first share F of steps
  (does a good start survive the batch rule?);
- `--normalised`: BatchTopK that ranks pre-activations divided by their encoder row's norm
  (does removing the norm's advantage stop the starvation?);
- from the planted dictionary (encoder = decoder = the true directions): the held-out FVU of
  each keep rule at the same L0 when the dictionary is already right;
- at the dictionaries trained from scratch (TopK's, and the batch rules' with relative and floor
  keys): the held-out FVU of each rule with that SAE's own encoder and decoder, so that what a
  rule costs and what the dictionary it learnt costs can be told apart.

    .venv/bin/python bench/batch_rule_probe.py --out BENCHMARKS-probe.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from common import command_line, md_table, publish

from vitscope.saes.architectures.batchtopk import (
    BatchRank,
    BatchTopKSAE,
    TokenScale,
    batch_topk_rule,
)
from vitscope.saes.kernels import KeepRule
from vitscope.saes.sae import SAE
from vitscope.train.config import TrainConfig
from vitscope.train.loader import tensor_batches
from vitscope.train.synthetic import PlantedWorld, planted_tokens, planted_world, recovery
from vitscope.train.trainer import fit, new_member

QUANTILES = torch.tensor([0.1, 0.5, 0.9])


def per_token_topk(k: int) -> KeepRule:
    """TopK's rule in the batch rule's flat form: each row's k largest."""

    def keep(product_BF: torch.Tensor) -> torch.Tensor:
        top_BK = product_BF.topk(k, dim=1).indices
        offsets_B1 = torch.arange(len(product_BF), device=product_BF.device)[:, None]
        return (top_BK + offsets_B1 * product_BF.shape[1]).view(-1).sort().values

    return keep


@contextmanager
def keep_rule(choose: Callable[[BatchTopKSAE, int], KeepRule | None]) -> Iterator[None]:
    """Replace BatchTopK's rule by `choose(sae, training steps so far)` where it returns one."""
    original = BatchTopKSAE._rule
    steps = {"done": 0}

    def rule(sae: BatchTopKSAE, x_centered: torch.Tensor) -> tuple[KeepRule, TokenScale]:
        steps["done"] += sae.training
        chosen = choose(sae, steps["done"])
        keep, scale = original(sae, x_centered)
        return (keep if chosen is None else chosen), scale  # a chosen rule's keys are raw

    BatchTopKSAE._rule = rule  # type: ignore[method-assign]
    try:
        yield
    finally:
        BatchTopKSAE._rule = original  # type: ignore[method-assign]


def warm_start(share: float, steps: int) -> Callable[[BatchTopKSAE, int], KeepRule | None]:
    """TopK's rule while training's step is within the first `share`, then the batch rule."""
    early = share * steps
    return lambda sae, step: per_token_topk(sae.k) if sae.training and step <= early else None


def normalised(sae: BatchTopKSAE, step: int) -> KeepRule:
    """In training the batch rule on pre-activations / encoder row norm; at inference each
    token's top k (θ is estimated in raw units, so it cannot threshold the ratios)."""
    if not sae.training:
        return per_token_topk(sae.k)
    inner = batch_topk_rule(sae.k)
    norms_F = sae.w_enc.detach().norm(dim=1)
    return lambda product_BF: inner(product_BF / norms_F)


def row(
    args,
    world: PlantedWorld,
    train_ND,
    heldout_ND,
    label: str,
    arch: str,
    planted: bool,
    **settings: float | str,
) -> tuple[str, SAE]:
    """Train one SAE and describe it: recovery, FVU, L0, latent rates, encoder norms."""
    cfg = TrainConfig(
        cache="(tensors)",
        out=tempfile.mkdtemp(prefix="batch-rule-probe-"),
        layer=0,
        device="cpu",
        architecture=arch,
        tokens=args.tokens,
        n_latents=args.latents,
        k=args.k,
        batch_size=args.batch,
        **settings,
    )
    member = new_member(cfg, args.d_in, train_ND[:8192], torch.device("cpu"))
    sae = member.sae
    if planted:
        with torch.no_grad():
            n = len(world.dirs_FD)
            sae.w_dec[:n] = world.dirs_FD
            sae.w_enc[:n] = world.dirs_FD
            sae.b_pre.copy_(world.offset_D * sae.input_scale)
    started = time.perf_counter()
    fit([member], tensor_batches(train_ND, args.batch), heldout_ND[:256].view(1, 256, -1), slice(0))
    seconds = time.perf_counter() - started
    sae.eval()
    with torch.no_grad():
        codes = sae.encode(heldout_ND)
        recon = sae.decode(codes)
        fvu = (recon - heldout_ND).pow(2).sum() / (heldout_ND - heldout_ND.mean(0)).pow(2).sum()
        fired = codes.indices[codes.values > 0]
        rate_F = torch.bincount(fired, minlength=args.latents).float() / len(heldout_ND)
        l0_N = (codes.values > 0).sum(dim=-1).float()
        norms = torch.quantile(sae.w_enc.norm(dim=1), QUANTILES)
    found = recovery(world, sae.w_dec)
    rates = torch.quantile(rate_F, QUANTILES)
    print(f"{label}: matched {found.matched:.1%} in {seconds:.0f} s", flush=True)
    text = " | ".join(
        [
            label,
            f"{found.matched:.1%}",
            f"{found.rarest_quarter_matched:.1%}",
            f"{float(fvu):.4f}",
            f"{float(l0_N.mean()):.1f} ± {float(l0_N.std()):.1f}",
            " / ".join(f"{float(r):.4f}" for r in rates),
            f"{float((rate_F == 0).float().mean()):.1%}",
            " / ".join(f"{float(v):.2f}" for v in norms),
        ]
    )
    return text, sae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=64)
    parser.add_argument("--directions", type=int, default=512)
    parser.add_argument("--latents", type=int, default=1024)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=2**20)
    parser.add_argument("--planted-tokens", type=int, default=2**18)
    parser.add_argument("--warmup", type=float, default=0.6)
    parser.add_argument(
        "--variant", action="append", default=[], help="a BatchTopK row with KEY=VALUE,..."
    )
    parser.add_argument("--only-variants", action="store_true", help="skip the fixed rows")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS-probe.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = planted_world(args.directions, args.d_in, seed=7)
    train_ND, _ = planted_tokens(world, args.tokens, 11)
    heldout_ND, _ = planted_tokens(world, 32768, 12)
    steps = args.tokens // args.batch
    rows = [
        row(args, world, train_ND, heldout_ND, f"batchtopk, {text}", "batchtopk", False, **kv)[0]
        for text, kv in map(settings, args.variant)
    ]
    at_trained = []
    if not args.only_variants:
        fixed, at_trained = fixed_rows(args, world, train_ND, heldout_ND, steps)
        rows += fixed
    header = (
        "SAE | matched > 0.9 | rarest quarter > 0.9 | held-out FVU | held-out L0 (mean ± sd)"
        " | latent firing rate q10 / q50 / q90 | latents unused | encoder row norm q10 / q50 / q90"
    )
    oracle = "rule at the planted dictionary | held-out FVU, least squares on the support | L0"
    body = [
        f"Planted world: {args.directions} directions in d_in {args.d_in} (seed 7, base knobs),"
        f" {args.latents} latents, k = {args.k}, batch {args.batch}, {steps} steps from scratch;"
        f" held out: 32,768 tokens. One torch thread.",
        "",
        *([*md_table(header, rows), ""] if rows else []),
        f"Each rule at the planted dictionary ({ORACLE_TOKENS:,} held-out tokens):",
        "",
        *md_table(oracle, oracle_rows(world, heldout_ND, args.k)),
    ]
    if at_trained:
        trained = "dictionary trained from scratch | " + " | ".join(TRAINED_RULES)
        body += [
            "",
            "Each rule at the dictionaries trained above (their own encoder and decoder, held-out "
            f"FVU, batches of {args.batch:,}, L0 {args.k} on average):",
            "",
            *md_table(trained, at_trained),
        ]
    publish(args.out, torch.device("cpu"), command_line(), body)


def settings(text: str) -> tuple[str, dict[str, float]]:
    """'lr=0.012,dead_tokens=8192' -> its label and TrainConfig values."""
    pairs = [item.split("=", 1) for item in text.split(",")]
    return ", ".join(f"{k} {v}" for k, v in pairs), {k: type_of(k)(v) for k, v in pairs}


def type_of(name: str) -> type:
    return type(getattr(TrainConfig, name))


def fixed_rows(args, world, train_ND, heldout_ND, steps: int) -> tuple[list[str], list[str]]:
    """Each architecture from scratch (the batch rules ranking each kind of key), the two
    rule experiments on raw keys, the planted starts; and each rule at the dictionaries trained
    from scratch with TopK's rule or keys other than raw."""
    trained = {"topk": row(args, world, train_ND, heldout_ND, "topk, from scratch", "topk", False)}
    for arch in ("batchtopk", "matryoshka"):
        for rank in RANKS:
            label = f"{arch} ({rank}), from scratch"
            trained[f"{arch} ({rank})"] = row(
                args, world, train_ND, heldout_ND, label, arch, False, batch_rank=rank
            )
    rows = [text for text, _ in trained.values()]
    with keep_rule(warm_start(args.warmup, steps)):
        label = f"batchtopk (raw), TopK's rule for the first {args.warmup:.0%} of steps"
        rows.append(row(args, world, train_ND, heldout_ND, label, "batchtopk", False, **RAW)[0])
    with keep_rule(normalised):
        label = "batchtopk ranking pre-activations / encoder row norm (inference: top k)"
        rows.append(row(args, world, train_ND, heldout_ND, label, "batchtopk", False, **RAW)[0])
    short = train_ND[: args.planted_tokens]
    args.tokens = args.planted_tokens
    for arch, rank in (("topk", "raw"), *(("batchtopk", rank) for rank in RANKS)):
        name = arch if arch == "topk" else f"{arch} ({rank})"
        label = f"{name}, from the planted dictionary, {args.planted_tokens:,} tokens"
        rows.append(row(args, world, short, heldout_ND, label, arch, True, batch_rank=rank)[0])
    args.tokens = steps * args.batch
    at_trained = [
        f"{name} | " + " | ".join(rules_at_dictionary(sae, heldout_ND, args.k, args.batch))
        for name, (_, sae) in trained.items()
        if "raw" not in name
    ]
    return rows, at_trained


RANKS: tuple[BatchRank, ...] = ("raw", "relative", "floor")
"""The batch rule's keys: raw pre-activations (Bussmann et al., SAELens), or over each token's
centred norm or floor."""
RAW = {"batch_rank": "raw"}


def oracle_rows(world: PlantedWorld, heldout_ND: torch.Tensor, k: int) -> list[str]:
    """Each rule's support at the planted dictionary itself (encoder = decoder = the true
    directions, b_pre = the true offset), each token then decoded by least squares on its
    support: the best FVU a rule allows with the dictionary already right, at L0 k on average.
    Apart from the dictionary's learning, this is what the rule costs."""
    centred_ND = heldout_ND[:ORACLE_TOKENS] - world.offset_D
    preacts_NF = centred_ND @ world.dirs_FD.T
    n_keep = k * len(preacts_NF)

    def keys(rank: BatchRank) -> torch.Tensor:
        return preacts_NF / TokenScale(rank, k, centred_ND)(preacts_NF)[:, None]

    supports = {
        "topk (each token's k largest)": preacts_NF.topk(k, dim=1).indices,
        "batch rule, raw keys": _batch_support(preacts_NF, n_keep),
        "batch rule, relative keys (pre / ‖x − b_pre‖)": _batch_support(keys("relative"), n_keep),
        "batch rule, floor keys (pre / the token's 2k-th largest pre)": _batch_support(
            keys("floor"), n_keep
        ),
    }
    total = (centred_ND - centred_ND.mean(dim=0)).pow(2).sum()
    rows = []
    for name, support in supports.items():
        error = sum(
            _least_squares_error(world.dirs_FD[latents], token)
            for latents, token in zip(support, centred_ND, strict=True)
        )
        sizes = torch.tensor([len(latents) for latents in support], dtype=torch.float32)
        rows.append(f"{name} | {float(error / total):.4f} | {sizes.mean():.1f} ± {sizes.std():.1f}")
    return rows


ORACLE_TOKENS = 4096
"""Held-out tokens the oracle decodes one by one."""


TRAINED_RULES: dict[str, BatchRank | None] = {
    "each token's top k": None,
    **{f"batch rule, {rank} keys": rank for rank in RANKS},
}
"""The keep rules compared at each trained dictionary: TopK's, and the batch rule on each key."""


def rules_at_dictionary(sae: SAE, heldout_ND: torch.Tensor, k: int, batch: int) -> list[str]:
    """The held-out FVU of each rule with a trained SAE's own encoder and decoder, in batches of
    the training's size (a batch rule's cut is the batch's): whether a rule or the dictionary it
    learnt costs reconstruction."""
    x_ND = sae.training_inputs(heldout_ND)
    total = (x_ND - x_ND.mean(dim=0)).pow(2).sum()
    errors = dict.fromkeys(TRAINED_RULES, 0.0)
    with torch.no_grad():
        for x_BD in x_ND.split(batch):
            centred_BD = x_BD - sae.b_pre
            product_BF = centred_BD @ sae.w_enc.T + sae.b_enc
            for name, rank in TRAINED_RULES.items():
                if rank is None:
                    kept_N = per_token_topk(k)(product_BF)
                else:
                    scale_B = TokenScale(rank, k, centred_BD)(product_BF)
                    kept_N = batch_topk_rule(k, scale_B)(product_BF)
                codes_N = torch.zeros_like(product_BF).view(-1)
                codes_N[kept_N] = product_BF.view(-1)[kept_N].relu()
                recon_BD = codes_N.view_as(product_BF) @ sae.w_dec + sae.b_pre
                errors[name] += float((recon_BD - x_BD).pow(2).sum())
    return [f"{error / float(total):.4f}" for error in errors.values()]


def _batch_support(keys_NF: torch.Tensor, n_keep: int) -> list[torch.Tensor]:
    """Each token's latents among the batch's n_keep largest keys."""
    cut = keys_NF.flatten().kthvalue(keys_NF.numel() - n_keep).values
    return [row.nonzero().squeeze(1) for row in keys_NF > cut]


def _least_squares_error(atoms_KD: torch.Tensor, token_D: torch.Tensor) -> torch.Tensor:
    """‖x − Aᵀc‖² for the non-negative part of the least-squares c on the atoms."""
    if len(atoms_KD) == 0:
        return token_D.pow(2).sum()
    coef = torch.linalg.lstsq(atoms_KD.T, token_D[:, None]).solution.clamp_min(0)
    return (token_D - (atoms_KD.T @ coef).squeeze(1)).pow(2).sum()


if __name__ == "__main__":
    main()
