"""`vitscope analyze` against a plain read of the same layer and against the training loader,
side by side in one run, and the analysis pass's peak memory at each width.

Random float16 caches of ViT-L/14's shape (T = 257, D = 1024) are written once, one per size;
an SAE of each width (random weights, k = 32) is saved as a real SAE folder. Each analysis pass
runs in a fresh process, so that its peak resident memory (VmHWM) is its own, and times
itself around `analyze()` (the SAE's loading included, Python's start-up not). Two cache sizes
show whether memory grows with the cache. All passes are timed in one round
(`common.alternate`); the plain read and the loader read the largest cache.

    .venv/bin/python bench/analyze_throughput.py --images 32,128 --widths 4096,65536
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
from vitscope.saes.architectures import build_sae
from vitscope.saes.architectures.topk import TopKOptions
from vitscope.saes.card import SAECard
from vitscope.saes.folder import save_sae_folder
from vitscope.support.memory import return_large_buffers
from vitscope.train.loader import ActivationStream, read_chunks

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
import re, sys, time
from pathlib import Path
from vitscope.analysis.analyze import analyze
from vitscope.analysis.config import AnalyzeConfig
from vitscope.support.memory import return_large_buffers
return_large_buffers()  # as the vitscope command does
sae, cache, out = sys.argv[1:]
start = time.perf_counter()
analyze(AnalyzeConfig(run=sae, cache=cache, out=out, grids=0, device="cpu"))
print("pass_s", time.perf_counter() - start, file=sys.stderr)
status = Path("/proc/self/status").read_text()
print("peak_kb", re.search(r"VmHWM:\\s+(\\d+)", status).group(1), file=sys.stderr)
"""
"""The child's peak is VmHWM, its own address space's: Linux carries ru_maxrss across exec, so
that would report the parent's peak (the loader's windows) when larger."""


def analysis_pass(sae_dir: Path, cache_path: Path, out: Path) -> Timing:
    """One `analyze()` in its own process: its own wall time (no start-up) and peak RSS (GB)."""
    command = [sys.executable, "-c", MEASURED, str(sae_dir), str(cache_path), str(out)]
    timing = timed(lambda: subprocess.run(command, check=True, capture_output=True, text=True))
    report = dict(line.split() for line in timing.result.stderr.splitlines()[-2:])
    cache = open_cache(cache_path)
    tokens = cache.n_rows * cache.attrs.n_tokens
    peak = f"{int(report['peak_kb']) / 1e6:.2f}"
    return dataclasses.replace(timing, wall=float(report["pass_s"]), result=(tokens, peak))


def random_sae(folder: Path, n_latents: int, cache_path: Path) -> Path:
    card = SAECard(
        1024,
        n_latents,
        TopKOptions(k=32),
        layer=LAYER,
        model="random",
        pretrained="none:seed=0",
        training={"cache": str(cache_path)},
    )
    save_sae_folder(folder, build_sae(card), card)
    return folder


def main() -> None:
    return_large_buffers()  # the reads below run as under the vitscope command
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", default="32,128", help="cache sizes, comma-separated")
    parser.add_argument("--widths", default="4096,65536")
    parser.add_argument("--out", type=Path, default=Path("bench/results/analyze_throughput.md"))
    args = parser.parse_args()
    sizes = [int(n) for n in args.images.split(",")]
    with tempfile.TemporaryDirectory(prefix="analyze-bench-") as tmp:
        work = Path(tmp)
        caches = {
            n: write_random_cache(work / f"cache{n}", n, chunk_images=16, layer=LAYER)
            for n in sizes
        }
        largest = caches[max(sizes)]
        runs = {
            PLAIN: partial(plain_read, largest),
            "training loader (shuffled batches)": partial(loader_read, largest),
        }
        for width in (int(w) for w in args.widths.split(",")):
            for n, cache_path in caches.items():
                sae_dir = random_sae(work / f"sae{width}-{n}", width, cache_path)
                out = work / f"analysis{width}-{n}"
                runs[f"analyze, {width:,} latents, k = 32, {n} images"] = partial(
                    analysis_pass, sae_dir, cache_path, out
                )
        timings = {name: found[0] for name, found in alternate(runs, 1).timings.items()}
    rate = {name: t.result[0] / t.wall for name, t in timings.items()}
    rows = (
        f"{name} | {rate[name]:,.0f} | {rate[name] / rate[PLAIN]:.3f} | {t.result[1]}"
        for name, t in timings.items()
    )
    body = [
        f"caches of {', '.join(map(str, sizes))} images x 257 tokens of float16 (D = 1024), "
        f"chunks of 16 images; the reads use the {max(sizes)}-image cache; torch threads "
        f"{torch.get_num_threads()}.",
        "",
        *md_table("pass | tokens/s | ratio to plain read | peak RSS (GB)", rows),
    ]
    publish(args.out, torch.device("cpu"), command_line(), body)


if __name__ == "__main__":
    main()
