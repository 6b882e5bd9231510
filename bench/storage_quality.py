"""Judge 8-bit storage by the SAE it trains: the same images cached as float16, int8 and float8
e4m3, one SAE per cache with the same seed and tokens, held-out FVU side by side.

Each SAE is evaluated on the float16 cache's held-out images (the same rows in every cache: same
chunking, same split seed), so the comparison measures what storage does to training, not to the
evaluation data.

    .venv/bin/python bench/storage_quality.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import command_line, md_table, publish
from photo_shards import write_photo_shards

from vitscope.cache_spec import open_cache
from vitscope.pipeline.config import CacheConfig
from vitscope.pipeline.run import cache
from vitscope.saes.folder import load_sae_folder
from vitscope.train.config import TrainConfig
from vitscope.train.loader import ActivationStream
from vitscope.train.metrics import heldout_metrics
from vitscope.train.run import train

STORAGES = ("float16", "int8", "float8_e4m3")


def storage_rows(workdir: Path, args: argparse.Namespace) -> list[str]:
    """Cache the photos and train one SAE per storage; a row per storage."""
    shards = write_photo_shards(workdir / "shards", n_images=args.images, shard_size=256)
    results = {}
    for storage in STORAGES:
        cache(
            CacheConfig(
                shards=str(shards),
                out=str(workdir / storage),
                layers=(args.layer,),
                model=args.model,
                pretrained="none",
                device="cpu",
                batch_size=32,
                num_workers=2,
                storage=storage,
                chunk_images=16,
                rows_per_shard=256,
            )
        )
        (run,) = train(
            [
                TrainConfig(
                    cache=str(workdir / storage),
                    layer=args.layer,
                    out=str(workdir / f"sae-{storage}"),
                    tokens=args.tokens,
                    batch_size=1024,
                    n_latents=args.latents,
                    k=32,
                    k_aux=256,
                    lr=5e-4,
                    dead_tokens=100_000,
                    buffer_tokens=2**15,
                    heldout_fraction=0.1,
                    eval_images=64,
                    log_every=args.tokens,
                    device="cpu",
                )
            ]
        )
        results[storage] = load_sae_folder(run)
    reference = open_cache(workdir / "float16", layer=args.layer)
    stream = ActivationStream(reference, args.layer, heldout_fraction=0.1)
    heldout, _ = stream.heldout_images(64)
    rows = []
    for storage, sae in results.items():
        own = open_cache(workdir / storage, layer=args.layer)
        own_heldout, _ = ActivationStream(own, args.layer, heldout_fraction=0.1).heldout_images(64)
        error = float((own_heldout - heldout).norm() / heldout.norm())
        fvu = heldout_metrics(sae, heldout, slice(None), 1024).fvu
        rows.append(f"{storage} | {own.encoding.bytes_per_value} | {error:.2e} | {fvu:.4f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=400_000)
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path("bench/results/storage_quality.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vitscope-storage-bench-") as tmp:
        rows = storage_rows(Path(tmp), args)
    body = [
        f"Random-weight {args.model} (no CLIP weights can be downloaded here) on scikit-image's "
        "photos, varied; one SAE per storage, same seed and tokens, evaluated on float16 data.",
        "",
        *md_table(
            "storage | bytes/value | cache error vs float16 (rel.) | held-out FVU on float16 data",
            rows,
        ),
    ]
    publish(args.out, torch.device("cpu"), command_line(), body)


if __name__ == "__main__":
    main()
