"""The MonoSemanticity Score's rate and peak memory at 65,536 latents: its sums alone, and
`vitscope monosemanticity` end to end with where its time goes.

Sums: `image_activations` + `MSAccumulator.add` on random sparse codes of ViT-L/14's shape
(C = 16 images x T = 257 tokens x k = 32 of F latents) with embeddings of ViT-L/14's width
(E = 768), once with R updated in full (addmm_) and once by the touched rows (index_add_),
then `scores()`. Pass: photo shards (bench/photo_shards.py) cached at layer 8 by a
seeded random ViT-B-32 (stage one, untimed), a random SAE of F latents (k = 32) on it, scored with
the cache's own model as encoder and with a random ViT-L-14. Every measurement runs in a fresh
process, so its peak resident memory (VmHWM) is its own; `common.Profile` splits the pass.

    .venv/bin/python bench/monosemanticity.py --images 64 --latents 65536
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch
from common import Profile, Timing, alternate, command_line, md_table, publish, timed
from photo_shards import write_photo_shards

from vitscope.analysis import monosemanticity as ms_module
from vitscope.analysis.config import MonosemanticityConfig
from vitscope.pipeline.config import CacheConfig
from vitscope.pipeline.model import ImageEncoder
from vitscope.saes.architectures import build_sae
from vitscope.saes.architectures.topk import TopKOptions
from vitscope.saes.card import SAECard
from vitscope.saes.folder import save_sae_folder
from vitscope.saes.sae import SAE

LAYER = 8
CHUNK, TOKENS, K, EMBED = 16, 257, 32, 768


def sums(n_latents: int, chunks: int) -> dict:
    """The accumulation alone, on CPU tensors made before the clock starts."""
    generator = torch.Generator().manual_seed(0)
    codes = []
    for _ in range(chunks):
        # K distinct latents per token, spread over F (a random offset, then every F/K-th).
        offset = torch.randint(n_latents, (CHUNK, TOKENS, 1), generator=generator)
        idx = ((offset + torch.arange(K) * (n_latents // K)) % n_latents).sort(dim=-1).values
        values = torch.rand(CHUNK, TOKENS, K, generator=generator)
        emb = torch.nn.functional.normalize(torch.randn(CHUNK, EMBED, generator=generator), dim=-1)
        codes.append((idx, values, emb))
    touched = sum(
        int(ms_module.image_activations(i, v, n_latents).ne(0).any(dim=0).sum())
        for i, v, _ in codes
    )
    timings = {}
    for path, dense_from in (("addmm_", 0.0), ("index_add_", 2.0)):  # R in full, or by rows
        ms_module.DENSE_FROM = dense_from
        acc = ms_module.MSAccumulator.empty(n_latents, EMBED)

        def fold(acc: ms_module.MSAccumulator = acc) -> None:
            for idx, values, emb in codes:
                acc.add(ms_module.image_activations(idx, values, n_latents), emb)

        timings[path] = timed(fold).wall
    scored = timed(acc.scores)
    return {
        "images": chunks * CHUNK,
        "touched": touched / chunks,
        "add_s": timings,
        "scores_s": scored.wall,
        "state_mb": sum(t.nbytes for t in (acc.weighted_FE, acc.act_sum_F, acc.act_sq_F)) / 1e6,
    }


def whole_pass(run: Path, encoder: str, weights: str) -> dict:
    """`vitscope monosemanticity`'s library call, its time split by `common.Profile`."""
    config = MonosemanticityConfig(
        run=str(run),
        out=str(run / f"ms-{encoder}"),
        encoder=encoder,
        encoder_weights=weights,
        device="cpu",
        num_workers=1,
        batch_size=16,
    )
    profile = Profile()
    with ExitStack() as stack:
        profile.patch(
            stack,
            [
                (ImageEncoder, "embed", "encoder forward", False),
                (SAE, "encode", "SAE encode", False),
                (ms_module, "image_activations", "image activations", False),
                (ms_module.MSAccumulator, "add", "sums", False),
                (ms_module.MSAccumulator, "scores", "scores", False),
            ],
        )
        timing = timed(lambda: ms_module.monosemanticity(config))
    return {"images": timing.result[1].n_images, "wall_s": timing.wall, "split": profile.main}


def child(args: argparse.Namespace) -> None:
    """One measurement in this fresh process: its result and peak RSS as JSON on stdout."""
    if args.child == "sums":
        result = sums(args.latents, args.chunks)
    else:
        result = whole_pass(args.run, args.encoder, args.weights)
    result["peak_gb"] = peak_rss_kb() / 1e6
    print(json.dumps(result))


def peak_rss_kb() -> int:
    """This process image's peak resident memory: VmHWM belongs to the memory map that exec made,
    while ru_maxrss keeps the high-water mark of the parent that forked it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measured(*flags: str) -> Timing:
    """This script in --child mode, in its own process; result: what it printed."""
    command = [sys.executable, __file__, *flags]
    timing = timed(lambda: subprocess.run(command, check=True, capture_output=True, text=True))
    return dataclasses.replace(timing, result=json.loads(timing.result.stdout.splitlines()[-1]))


def prepare(work: Path, n_images: int, n_latents: int) -> Path:
    """Photo shards, their ViT-B-32 cache (layer 8) and a random SAE on it (untimed)."""
    from vitscope.pipeline.run import cache

    shards = write_photo_shards(work / "shards", n_images, shard_size=32)
    config = CacheConfig(
        shards=str(shards),
        out=str(work / "cache"),
        layers=(LAYER,),
        model="ViT-B-32",
        pretrained="none",
        device="cpu",
        num_workers=1,
        batch_size=16,
    )
    summary = cache(config)
    d_model = 768
    card = SAECard(
        d_model,
        n_latents,
        TopKOptions(k=K),
        layer=LAYER,
        model="ViT-B-32",
        pretrained="none:seed=0",
        training={"cache": str(summary.cache)},
    )
    save_sae_folder(work / "sae", build_sae(card), card)
    return work / "sae"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--latents", type=int, default=65_536)
    parser.add_argument("--chunks", type=int, default=8, help="chunks of 16 images (sums)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/monosemanticity.md"))
    parser.add_argument("--child", choices=("sums", "pass"), help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--encoder", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="ms-bench-") as tmp:
        run = prepare(Path(tmp), args.images, args.latents)
        size = ["--latents", str(args.latents), "--chunks", str(args.chunks)]
        runs = {
            "sums": lambda: measured("--child", "sums", *size),
            "ViT-B-32": lambda: measured("--child", "pass", "--run", str(run), "--encoder",
                                         "ViT-B-32", "--weights", "none:seed=0"),
            "ViT-L-14": lambda: measured("--child", "pass", "--run", str(run), "--encoder",
                                         "ViT-L-14", "--weights", "none"),
        }  # fmt: skip
        found = {name: t[0].result for name, t in alternate(runs, 1).timings.items()}
    s = found["sums"]
    sums_rows = [
        f"image activations + sums, R by {path} | {s['images'] / wall:,.0f} images/s | "
        f"{wall / s['images'] * 1e3:.1f} ms | {s['peak_gb']:.2f}"
        for path, wall in s["add_s"].items()
    ]
    sums_rows += [
        f"scores() | {args.latents / s['scores_s']:,.0f} features/s | "
        f"{s['scores_s']:.2f} s for all | {s['peak_gb']:.2f}",
    ]
    pass_rows = []
    for encoder in ("ViT-B-32", "ViT-L-14"):
        p = found[encoder]
        split = ", ".join(f"{label} {seconds:.1f}" for label, seconds in p["split"].items())
        pass_rows.append(
            f"{encoder} | {p['images'] / p['wall_s']:.1f} | {p['wall_s']:.1f} | {split} | "
            f"{p['peak_gb']:.2f}"
        )
    body = [
        f"Sums: {s['images']} images (C = {CHUNK}, T = {TOKENS}, k = {K}) into F = "
        f"{args.latents:,}, E = {EMBED}, {s['touched']:,.0f} features touched per chunk on "
        f"average: R, P and Q hold {s['state_mb']:.0f} MB. "
        f"Pass: {found['ViT-B-32']['images']} photos, random SAE of {args.latents:,} latents on "
        f"ViT-B-32 layer {LAYER} (D = 768, T = 50); torch threads {torch.get_num_threads()}.",
        "",
        *md_table("step | rate | per image / total | peak RSS (GB)", sums_rows),
        "",
        *md_table(
            "encoder | images/s | wall (s) | inside (s) | peak RSS (GB)",
            pass_rows,
        ),
    ]
    publish(args.out, torch.device("cpu"), command_line(), body)


if __name__ == "__main__":
    main()
