"""The cache's compression presets and chunk sizes on ViT-L-14 activations: bytes per value, write
and read throughput, and the 8-bit storages' error against float32.

Why: `cache_spec/codecs.py` names a default codec and SPEC.md sizes the cache in bytes per value;
both rest on these numbers. Residual-stream activations after blocks 2, 11 and 20 of ViT-L-14
(seeded random weights: nothing can be downloaded here) on scikit-image's photos go through the
real cache code (`create_or_open`, `Cache.write_chunk`, `commit`, `open_cache`, `read_chunk`) with
every preset in `CODECS` and chunk sizes 8..64 in float16, then in the 8-bit storages at C=16.

Each measurement writes a fresh cache (timed: `write_chunk` of every chunk of every layer, encoding
included, into the page cache), sizes its layer folders, commits it and reads every chunk back in
`chunks(order='random')` order as float32 (timed; from the page cache, so decoding, not a disk).
MB/s count raw float16 bytes: medians, as median (slowest–fastest), of rounds alternated across
settings (`common.alternate`). Lossless presets are checked to decode to exactly the same values.

Read cost = seconds per raw float16 GB for one reader thread: fetch the stored bytes at DISK_GBPS
with CHUNK_LATENCY_S per chunk file (the request latency of shared storage, which the page cache
hides), then decode at the fastest measured read. The rule: the preset of lowest read cost at
C=REFERENCE_CHUNK, or none unless it is more than TOLERANCE cheaper; then C=REFERENCE_CHUNK unless
another chunk size is more than TOLERANCE cheaper.

    .venv/bin/python bench/codecs.py [--images 64] [--repeats 3] [--out bench/results/codecs.md]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numcodecs
import torch
import zarr
from common import (
    alternate,
    command_line,
    commit_rows,
    layer_bytes,
    log,
    md_table,
    padded,
    publish,
    single_shard_attrs,
    timed,
)
from photo_shards import load_photos
from PIL import Image, ImageOps

from vitscope.cache_spec import create_or_open, open_cache
from vitscope.cache_spec.codecs import CODECS
from vitscope.pipeline.model import VisionTower, load_vision_tower, residual_stream

MODEL = "ViT-L-14"
LAYERS = (2, 11, 20)
N_TOKENS, D_MODEL = 257, 1024
BATCH = 8
CHUNK_SIZES = (8, 16, 32, 64)
REFERENCE_CHUNK = 16
"""Chunk size of the 8-bit runs and of the codec comparison, and the default chunk size unless
another reads more than TOLERANCE cheaper: the middle ground between shuffle quality and memory
(smaller chunks) and fewer files (bigger ones), and SPEC.md's example."""
EIGHT_BIT_STORAGES = ("int8", "float8_e4m3")
DISK_GBPS = 1.0
"""Reference bandwidth (GB/s of stored bytes) of the disk stage two reads from."""
CHUNK_LATENCY_S = 1e-3
"""Reference cost of opening one chunk file on shared storage, which the page cache hides."""
TOLERANCE = 0.20
"""Read costs closer than this count as equal: on the shared 2-core VM this was written on, one
setting's read cost varied by up to ~20% from run to run."""
SIZE_TIE = 0.005
"""Presets whose sizes differ by less than this fraction count as equally small."""


@dataclass
class Run:
    """Measurements of one (storage, codec, chunk size) setting over the rounds."""

    storage: str
    codec: str
    chunk_images: int
    n_values: int
    """Activation values written: images x T x D x layers."""
    disk_bytes: int = 0
    write_s: list[float] = field(default_factory=list)
    read_s: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.storage} {self.codec} C={self.chunk_images}"

    @property
    def bytes_per_value(self) -> float:
        return self.disk_bytes / self.n_values

    def mbps(self, seconds: float) -> float:
        """MB/s of raw float16 bytes."""
        return self.n_values * 2 / seconds / 1e6

    def mbps_cell(self, seconds: list[float]) -> str:
        """'median (slowest–fastest)' in MB/s of raw float16 bytes."""
        slow, fast = self.mbps(max(seconds)), self.mbps(min(seconds))
        return f"{self.mbps(statistics.median(seconds)):.0f} ({slow:.0f}–{fast:.0f})"

    @property
    def best_read_mbps(self) -> float:
        """Read MB/s of the fastest round: the one least slowed by other jobs."""
        return self.mbps(min(self.read_s))

    @property
    def read_cost(self) -> float:
        """Seconds to deliver 1 GB of raw float16 to one reader thread: fetch, then decode."""
        chunks_per_gb = 1e9 / (self.chunk_images * N_TOKENS * D_MODEL * 2)
        fetch_s = self.bytes_per_value / 2 / DISK_GBPS + chunks_per_gb * CHUNK_LATENCY_S
        return fetch_s + 1e3 / self.best_read_mbps

    def row(self, with_storage: bool) -> str:
        first = f"{self.storage} + {self.codec}" if with_storage else self.codec
        return (
            f"{first} | {self.chunk_images} | {self.bytes_per_value:.3f} | "
            f"{2.0 / self.bytes_per_value:.3f} | {self.mbps_cell(self.write_s)} | "
            f"{self.mbps_cell(self.read_s)} | {self.read_cost:.2f}"
        )


# ------------------------------------------------------------------------------- activations
def bench_images(n_images: int) -> list[Image.Image]:
    """n distinct RGB images: every photo, then its mirror, then two 75% crops."""
    photos = list(load_photos().values())
    variants: list[Callable[[Image.Image], Image.Image]] = [
        lambda im: im,
        ImageOps.mirror,
        lambda im: im.crop((0, 0, im.width * 3 // 4, im.height * 3 // 4)),
        lambda im: im.crop((im.width // 4, im.height // 4, *im.size)),
    ]
    if not 0 < n_images <= len(photos) * len(variants):
        raise SystemExit(f"--images must be 1..{len(photos) * len(variants)}")
    return [variant(photo) for variant in variants for photo in photos][:n_images]


def activations(tower: VisionTower, images: list[Image.Image]) -> dict[int, torch.Tensor]:
    """The residual stream after each of LAYERS as float32 (N, T, D), computed in batches."""
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in LAYERS}
    for start in range(0, len(images), BATCH):
        batch_BCHW = torch.stack([tower.preprocess(im) for im in images[start : start + BATCH]])
        for layer, acts_BTD in residual_stream(tower, batch_BCHW, list(LAYERS)).items():
            parts[layer].append(acts_BTD.float().clone())
    return {layer: torch.cat(tensors) for layer, tensors in parts.items()}


# ---------------------------------------------------------------------------------- measuring
def measure_once(workdir: Path, run: Run, acts: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Write a fresh cache, size it, commit it, read it back; returns the decoded values."""
    n_images, per_chunk = len(acts[LAYERS[0]]), run.chunk_images
    attrs = single_shard_attrs(
        n_images, per_chunk, N_TOKENS, D_MODEL, LAYERS, run.storage, run.codec
    )
    path = workdir / f"{run.storage}-{run.codec}-{per_chunk}"
    store = create_or_open(path, attrs)
    chunks = {
        layer: [padded(c, per_chunk) for c in acts[layer].split(per_chunk)] for layer in LAYERS
    }
    gc.collect()

    def write() -> None:
        for layer in LAYERS:
            for index, chunk_CTD in enumerate(chunks[layer]):
                store.write_chunk(layer, index, chunk_CTD)

    run.write_s.append(timed(write).wall)
    disk_bytes = layer_bytes(path)
    if run.disk_bytes not in (0, disk_bytes):
        raise AssertionError(f"{run.label}: {disk_bytes} bytes, {run.disk_bytes} before")
    run.disk_bytes = disk_bytes
    commit_rows(store, n_images)
    cache = open_cache(path)
    refs = cache.chunks(order="random", seed=0)
    gc.collect()
    read = timed(
        lambda: {layer: [cache.read_chunk(layer, ref) for ref in refs] for layer in LAYERS}
    )
    run.read_s.append(read.wall)
    shutil.rmtree(path)
    order = sorted(range(len(refs)), key=lambda i: refs[i].first_row)
    return {layer: torch.cat([parts[i] for i in order]) for layer, parts in read.result.items()}


def sweep(
    workdir: Path,
    runs: list[Run],
    acts: dict[int, torch.Tensor],
    repeats: int,
    check: Callable[[Run, dict[int, torch.Tensor]], None],
) -> None:
    """Every run once per round, alternated, each checked (and its decoded values let go)."""

    def measure(run: Run) -> Callable:
        return lambda: timed(lambda: check(run, measure_once(workdir, run, acts)))

    alternate({run.label: measure(run) for run in runs}, repeats)


def require_equal(decoded: dict[int, torch.Tensor], expected: dict[int, torch.Tensor], what: str):
    """Lossless codecs must decode to exactly the same values."""
    for layer in LAYERS:
        if not torch.equal(decoded[layer], expected[layer]):
            raise AssertionError(f"{what}: layer {layer} decodes to other values")


def error_row(decoded: dict[int, torch.Tensor], exact: dict[int, torch.Tensor]) -> list[float]:
    """||decoded - exact|| / ||exact|| over all layers then each layer; all tokens, then CLS."""

    def squared(values: torch.Tensor) -> float:
        return torch.linalg.vector_norm(values, dtype=torch.float64).item() ** 2

    row = []
    for t in (slice(None), slice(0, 1)):
        norms = [
            (squared(decoded[k][:, t] - exact[k][:, t]), squared(exact[k][:, t])) for k in LAYERS
        ]
        row.append((sum(e for e, _ in norms) / sum(r for _, r in norms)) ** 0.5)
        row.extend((e / r) ** 0.5 for e, r in norms)
    return row


def measure_all(acts: dict[int, torch.Tensor], repeats: int) -> tuple[list[Run], list[Run], dict]:
    """Every float16 setting, then the 8-bit storages with the best compressing preset and with
    none; returns the float16 runs, the C=REFERENCE_CHUNK comparison, and the 8-bit values."""
    n_values = len(acts[LAYERS[0]]) * N_TOKENS * D_MODEL * len(LAYERS)
    exact16 = {layer: a.half().float() for layer, a in acts.items()}
    runs = [Run("float16", codec, c, n_values) for codec in CODECS for c in CHUNK_SIZES]
    decoded: dict[str, dict[int, torch.Tensor]] = {}

    def check_eight_bit(run: Run, values: dict[int, torch.Tensor]) -> None:
        if run.storage in decoded:
            require_equal(values, decoded[run.storage], run.label)
        else:
            decoded[run.storage] = values

    workdir = Path(tempfile.mkdtemp(prefix="vitscope-bench-codecs-"))
    try:
        sweep(workdir, runs, acts, repeats, lambda r, d: require_equal(d, exact16, r.label))
        codecs = list(dict.fromkeys([pick_compressing(runs).codec, "none"]))
        eight = [Run(s, c, REFERENCE_CHUNK, n_values) for s in EIGHT_BIT_STORAGES for c in codecs]
        sweep(workdir, eight, acts, repeats, check_eight_bit)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return runs, [find(runs, "float16", c, REFERENCE_CHUNK) for c in codecs] + eight, decoded


# ---------------------------------------------------------------------------------- picking
def find(runs: list[Run], storage: str, codec: str, chunk_images: int) -> Run:
    return next(
        r for r in runs if (r.storage, r.codec, r.chunk_images) == (storage, codec, chunk_images)
    )


def pick_compressing(runs: list[Run]) -> Run:
    """The float16 preset that stores fewest bytes at C=REFERENCE_CHUNK (fastest read of those
    within SIZE_TIE of the smallest): the best that compression offers."""
    candidates = [r for r in runs if r.chunk_images == REFERENCE_CHUNK and r.codec != "none"]
    smallest = min(r.bytes_per_value for r in candidates)
    tied = [r for r in candidates if r.bytes_per_value <= smallest * (1 + SIZE_TIE)]
    return min(tied, key=lambda r: r.read_cost)


def picks(runs: list[Run]) -> str:
    """The read-cost rule's default, and where the best compressing preset would pay."""
    at_chunk = [r for r in runs if r.chunk_images == REFERENCE_CHUNK]
    best, none = (
        min(at_chunk, key=lambda r: r.read_cost),
        find(runs, "float16", "none", REFERENCE_CHUNK),
    )
    codec = none if none.read_cost <= best.read_cost * (1 + TOLERANCE) else best
    cheapest = min((r for r in runs if r.codec == codec.codec), key=lambda r: r.read_cost)
    chunk = codec if codec.read_cost <= cheapest.read_cost * (1 + TOLERANCE) else cheapest
    squeeze = pick_compressing(runs)
    saving = 1 - squeeze.bytes_per_value / none.bytes_per_value
    extra_decode_s = 1e3 / squeeze.best_read_mbps - 1e3 / none.best_read_mbps
    where = (
        f"pays where a reader thread gets less than {saving / extra_decode_s:.2f} GB/s from storage"
        if extra_decode_s > 0
        else "decodes faster than raw float16 reads"
    )
    return (
        f"Default by the read-cost rule: **{chunk.codec} with chunk_images={chunk.chunk_images}** "
        f"(cheapest chunk size for it: C={cheapest.chunk_images}). The best compressing preset, "
        f"{squeeze.codec}, stores {saving:.0%} fewer bytes than raw float16 and {where}."
    )


# ------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images to encode (1..96)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/codecs.md"))
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    images = bench_images(args.images)
    tower = load_vision_tower(MODEL, "none", "cpu", "float32", seed=0)
    forward = timed(partial(activations, tower, images))
    acts = forward.result
    del tower
    log(f"activations of {args.images} images in {forward.wall:.0f} s")
    timing = timed(lambda: measure_all(acts, args.repeats))
    runs, compared, decoded = timing.result
    n_values = runs[0].n_values
    errors = {"float16": error_row({k: a.half().float() for k, a in acts.items()}, acts)}
    errors.update({storage: error_row(values, acts) for storage, values in decoded.items()})
    names = [f"L{layer}" for layer in LAYERS]
    stats = []
    for layer, acts_NTD in acts.items():
        rms_T = acts_NTD.pow(2).mean(dim=(0, 2)).sqrt()
        cells = [acts_NTD.pow(2).mean().sqrt(), acts_NTD.abs().max(), rms_T[0], rms_T[1:].mean()]
        stats.append(f"{layer} | " + " | ".join(f"{float(v):.3g}" for v in cells))
    runs_header = "C | bytes/value | ratio vs raw f16 | write MB/s | read MB/s | read cost s/GB"
    body = [
        f"{MODEL}, seeded random weights (not CLIP's activations: trained ViTs have outlier "
        f"channels and high-norm tokens), blocks {', '.join(map(str, LAYERS))}; "
        f"{args.images} images, "
        f"{n_values:,} values per cache ({n_values * 2 / 1e6:.0f} MB as raw float16), forward "
        f"{forward.wall:.0f} s; {args.repeats} rounds; zarr {zarr.__version__}, numcodecs "
        f"{numcodecs.__version__}; caches under {tempfile.gettempdir()}. The timed part took "
        f"{timing.wall:.0f} s; others used {timing.others_cell} CPU s meanwhile."
        + (
            " Tail chunks are padded with zeros, which inflates the bigger chunks' bytes."
            if args.images % max(CHUNK_SIZES)
            else ""
        ),
        "",
        *md_table("layer | RMS | max abs | CLS RMS | patch RMS", stats),
        "",
        *md_table("codec | " + runs_header, (r.row(False) for r in runs)),
        "",
        f"8-bit storage at C={REFERENCE_CHUNK} (bytes include the float32 scales, one per "
        "channel per chunk), beside float16 with the same codecs:",
        "",
        *md_table("storage + codec | " + runs_header, (r.row(True) for r in compared)),
        "",
        "Relative error ||decoded − exact|| / ||exact|| against float32, over all layers then per "
        "layer, for all tokens and for the CLS token alone:",
        "",
        *md_table(
            " | ".join(["storage", "all", *names, "CLS all", *(f"CLS {n}" for n in names)]),
            (f"{name} | " + " | ".join(f"{e:.2e}" for e in row) for name, row in errors.items()),
        ),
        "",
        picks(runs),
    ]
    publish(args.out, torch.device("cpu"), command_line(), body, append=False)


if __name__ == "__main__":
    main()
