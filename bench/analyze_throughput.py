"""`vitscope analyze` against a plain read of the same layer and against the training loader,
side by side in one run, and the analysis pass's peak memory at each width.

A random float16 cache of ViT-L/14's shape (T = 257, D = 1024) is written once; an SAE of each
width (random weights, k = 32) is saved as a real SAE folder. Each analysis pass runs in a fresh
process (`vitscope analyze`), so its peak resident memory (ru_maxrss) is its own. All passes are
timed in one round (`common.alternate`).

    .venv/bin/python bench/analyze_throughput.py --images 64 --widths 4096,65536
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
from common import (
    Timing,
    alternate,
    command_line,
    md_table,
    publish,
    take_tokens,
    timed,
    write_random_cache,
)

from vitscope.cache_spec import open_cache
from vitscope.train.card import SAECard
from vitscope.train.loader import ActivationStream, read_chunks
from vitscope.train.sae import TopKSAE
from vitscope.train.sae_folder import save_sae_folder

LAYER = 20
PLAIN = "plain read (read_chunks, 4 threads)"


def plain_read(cache_path: Path) -> Timing:
    """Every chunk read and decoded once, in order (stage two's chunk reader); result: tokens
    and no peak RSS, as for each run."""
    cache = open_cache(cache_path)
    chunks = read_chunks(cache, LAYER, cache.chunks(), threads=4)
    return timed(lambda: (sum(chunk.shape[0] * chunk.shape[1] for _, chunk in chunks), "-"))


def loader_read(cache_path: Path) -> Timing:
    """The training loader's shuffled batches over one epoch."""
    stream = ActivationStream(open_cache(cache_path), LAYER, heldout_fraction=1e-9)
    return timed(lambda: (take_tokens(stream.batches(0), stream.epoch_tokens), "-"))


MEASURED = """
import resource, runpy, sys
sys.argv = ["vitscope", *sys.argv[1:]]
try:
    runpy.run_module("vitscope", run_name="__main__")
finally:
    print("peak_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def analysis_pass(sae_dir: Path, cache_path: Path, out: Path) -> Timing:
    """`vitscope analyze`, run in its own process, and its peak RSS (GB)."""
    args = ["analyze", str(sae_dir), "--cache", str(cache_path), "--out", str(out)]
    command = [sys.executable, "-c", MEASURED, *args, "--grids", "0", "--device", "cpu"]
    timing = timed(lambda: subprocess.run(command, check=True, capture_output=True, text=True))
    peak_kb = int(timing.result.stderr.rsplit("peak_kb", 1)[1].split()[0])
    cache = open_cache(cache_path)
    return dataclasses.replace(
        timing, result=(cache.n_rows * cache.attrs.n_tokens, f"{peak_kb / 1e6:.2f}")
    )


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
    with tempfile.TemporaryDirectory(prefix="analyze-bench-") as tmp:
        work = Path(tmp)
        cache_path = write_random_cache(work / "cache", args.images, chunk_images=16, layer=LAYER)
        runs = {
            PLAIN: partial(plain_read, cache_path),
            "training loader (shuffled batches)": partial(loader_read, cache_path),
        }
        for width in (int(w) for w in args.widths.split(",")):
            sae_dir = random_sae(work / f"sae{width}", width, cache_path)
            out = work / f"analysis{width}"
            runs[f"analyze, {width:,} latents, k = 32"] = partial(
                analysis_pass, sae_dir, cache_path, out
            )
        timings = {name: found[0] for name, found in alternate(runs, 1).timings.items()}
    rate = {name: t.result[0] / t.wall for name, t in timings.items()}
    rows = (
        f"{name} | {rate[name]:,.0f} | {rate[name] / rate[PLAIN]:.3f} | {t.result[1]}"
        for name, t in timings.items()
    )
    tokens = args.images * 257
    body = [
        f"{args.images} images x 257 tokens = {tokens:,} tokens of float16 (D = 1024), "
        f"torch threads {torch.get_num_threads()}.",
        "",
        *md_table("pass | tokens/s | ratio to plain read | peak RSS (GB)", rows),
    ]
    publish(args.out, torch.device("cpu"), command_line(), body)


if __name__ == "__main__":
    main()
