"""`vitscope analyze` against a plain read of the same layer and against the training loader,
side by side in one run, and the analysis pass's peak memory at each width.

A random float16 cache of ViT-L/14's shape (T = 257, D = 1024) is written once; an SAE of each
width (random weights, k = 32) is saved as a real SAE folder. Each analysis pass runs in a fresh
process (`vitscope analyze`), so its peak resident memory (ru_maxrss) is its own.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import command_line, loader_rate, publish, write_random_cache

from vitscope.cache_spec import open_cache
from vitscope.train.card import SAECard
from vitscope.train.loader import ActivationStream, read_chunks
from vitscope.train.sae import TopKSAE
from vitscope.train.sae_folder import save_sae_folder

LAYER = 20


def plain_read(cache_path: Path) -> float:
    """Tokens/s of reading and decoding every chunk once, in order (stage two's chunk reader)."""
    cache = open_cache(cache_path)
    start, tokens = time.perf_counter(), 0
    for _, chunk in read_chunks(cache, LAYER, cache.chunks(), threads=4):
        tokens += chunk.shape[0] * chunk.shape[1]
    return tokens / (time.perf_counter() - start)


def loader_read(cache_path: Path) -> float:
    """Tokens/s of the training loader's shuffled batches over one epoch."""
    stream = ActivationStream(open_cache(cache_path), LAYER, heldout_fraction=1e-9)
    seen, seconds = loader_rate(stream, stream.epoch_tokens)
    return seen / seconds


MEASURED = """
import resource, runpy, sys
sys.argv = ["vitscope", *sys.argv[1:]]
try:
    runpy.run_module("vitscope", run_name="__main__")
finally:
    print("peak_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def analysis_pass(sae_dir: Path, cache_path: Path, out: Path) -> tuple[float, float]:
    """Tokens/s and peak RSS (GB) of `vitscope analyze`, run in its own process."""
    args = ["analyze", str(sae_dir), "--cache", str(cache_path), "--out", str(out)]
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", MEASURED, *args, "--grids", "0", "--device", "cpu"],
        check=True,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    peak_kb = int(done.stderr.rsplit("peak_kb", 1)[1].split()[0])
    cache = open_cache(cache_path)
    return cache.n_rows * cache.attrs.n_tokens / seconds, peak_kb / 1e6


def random_sae(folder: Path, n_latents: int, cache_path: Path) -> Path:
    sae = TopKSAE(1024, n_latents, 32, seed=0)
    card = SAECard(
        1024,
        n_latents,
        32,
        layer=LAYER,
        model="random",
        pretrained="none:seed=0",
        training={"cache": str(cache_path)},
    )
    save_sae_folder(folder, sae, card)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--widths", default="4096,65536")
    parser.add_argument("--out", type=Path, default=Path("bench/results/analyze_throughput.md"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="analyze-bench-"))
    try:
        cache_path = write_random_cache(work / "cache", args.images, chunk_images=16, layer=LAYER)
        rows = [
            "| pass | tokens/s | ratio to plain read | peak RSS (GB) |",
            "| --- | --- | --- | --- |",
        ]
        read_rate = plain_read(cache_path)
        rows.append(f"| plain read (read_chunks, 4 threads) | {read_rate:,.0f} | 1.00 | - |")
        loader_tokens_s = loader_read(cache_path)
        rows.append(
            f"| training loader (shuffled batches) | {loader_tokens_s:,.0f} | "
            f"{loader_tokens_s / read_rate:.2f} | - |"
        )
        for width in (int(w) for w in args.widths.split(",")):
            sae_dir = random_sae(work / f"sae{width}", width, cache_path)
            rate, peak = analysis_pass(sae_dir, cache_path, work / f"analysis{width}")
            rows.append(
                f"| analyze, {width:,} latents, k = 32 | {rate:,.0f} | {rate / read_rate:.3f} | "
                f"{peak:.2f} |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tokens = args.images * 257
    body = [
        f"{args.images} images x 257 tokens = {tokens:,} tokens of float16 (D = 1024), "
        f"torch threads {torch.get_num_threads()}.",
        "",
        *rows,
    ]
    publish(args.out, torch.device("cpu"), command_line(), body)


if __name__ == "__main__":
    main()
