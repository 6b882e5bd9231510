"""Measure the cache's compression presets and chunk sizes on real ViT-L-14 activations.

Why this exists: `cache_spec/codecs.py` names a default codec and SPEC.md sizes the cache in bytes
per value; both should rest on measurements. This script computes residual-stream activations
(after blocks 2, 11 and 20 of ViT-L-14, on scikit-image's photos), writes them through the real
cache code path (`create_or_open`, `Cache.write_chunk`, `Cache.commit`, `open_cache`,
`Cache.read_chunk`) with every preset in `CODECS` and chunk sizes 8..64 in float16, then in the
8-bit storages at C=16, and writes a markdown report: bytes per value, write and read throughput,
and the 8-bit storages' error against the float32 activations.

Run from the repository root (under 3 minutes on 2 idle CPU cores; no GPU or network needed):

    .venv/bin/python bench/codecs.py [--images 64] [--repeats 3] [--out bench/results/codecs.md]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numcodecs
import pyarrow as pa
import torch
import zarr
from PIL import Image, ImageOps

from vitscope.cache_spec import CacheAttrs, ShardCommit, create_or_open, open_cache
from vitscope.cache_spec.codecs import CODECS
from vitscope.cache_spec.layout import ROWS_SCHEMA
from vitscope.cache_spec.store import utc_now, writer_id
from vitscope.demo import PHOTO_CAPTIONS, photo_dir
from vitscope.pipeline.model import VisionTower, load_vision_tower, residual_stream

MODEL = "ViT-L-14"
SEED = 0
LAYERS = (2, 11, 20)
N_TOKENS = 257
D_MODEL = 1024
BATCH = 8
CHUNK_SIZES = (8, 16, 32, 64)
REFERENCE_CHUNK = 16
"""Chunk size of the 8-bit runs and of the codec comparison, and the default chunk size unless
another reads more than TOLERANCE cheaper: the middle ground between shuffle quality and memory
(smaller chunks) and fewer files (bigger ones), and SPEC.md's example."""
EIGHT_BIT_STORAGES = ("int8", "float8_e4m3")
SHARD = "00000.tar"
DISK_GBPS = 1.0
"""Reference bandwidth (GB/s of stored bytes) of the disk stage two reads from; see `read_cost`."""
CHUNK_LATENCY_S = 1e-3
"""Reference cost of opening one chunk file on shared storage, which the page cache hides."""
WORKLOAD_TOKENS = 1.2e9
"""Tokens per layer of the target workload (about 4.7 M images of 257 tokens)."""
TOLERANCE = 0.20
"""Read costs closer than this fraction count as equal: on the shared 2-core VM this was written
on, one setting's read cost varied by up to ~20% from run to run. A preset must beat no
compression, and a chunk size REFERENCE_CHUNK, by more to be picked."""
SIZE_TIE = 0.005
"""Presets whose sizes differ by less than this fraction count as equally small."""


@dataclass
class Run:
    """Measurements of one (storage, codec, chunk size) setting over the repetitions."""

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

    @property
    def ratio(self) -> float:
        """Compression ratio against raw float16 (2 bytes per value)."""
        return 2.0 / self.bytes_per_value

    def mbps(self, seconds: list[float]) -> float:
        """Throughput in MB/s of raw float16 bytes, from the median of `seconds`."""
        return self.n_values * 2 / statistics.median(seconds) / 1e6

    def mbps_cell(self, seconds: list[float]) -> str:
        """'median (slowest–fastest)' in MB/s of raw float16 bytes."""
        slow, fast = (self.n_values * 2 / s / 1e6 for s in (max(seconds), min(seconds)))
        return f"{self.mbps(seconds):.0f} ({slow:.0f}–{fast:.0f})"

    @property
    def best_read_mbps(self) -> float:
        """Read MB/s of the fastest repetition: the one least slowed by other jobs."""
        return self.mbps([min(self.read_s)])

    @property
    def read_cost(self) -> float:
        """Seconds to deliver 1 GB of raw float16 to one reader thread: fetch, then decode.

        Fetching moves the stored bytes at DISK_GBPS and pays CHUNK_LATENCY_S per chunk file;
        decoding takes the fastest measured (page-cache) read. Size and read speed count alike,
        as a read-heavy trainer sees them.
        """
        chunks_per_gb = 1e9 / (self.chunk_images * N_TOKENS * D_MODEL * 2)
        fetch_s = self.bytes_per_value / 2 / DISK_GBPS + chunks_per_gb * CHUNK_LATENCY_S
        return fetch_s + 1e3 / self.best_read_mbps


# ------------------------------------------------------------------------------- activations
def bench_images(n_images: int) -> list[tuple[Image.Image, str]]:
    """n distinct RGB images with captions: every photo, then its mirror, then two 75% crops."""
    names = sorted(PHOTO_CAPTIONS)
    variants: list[tuple[str, Callable[[Image.Image], Image.Image]]] = [
        ("", lambda im: im),
        (" (mirrored)", ImageOps.mirror),
        (" (top-left crop)", lambda im: im.crop((0, 0, im.width * 3 // 4, im.height * 3 // 4))),
        (" (bottom-right crop)", lambda im: im.crop((im.width // 4, im.height // 4, *im.size))),
    ]
    if not 0 < n_images <= len(names) * len(variants):
        raise SystemExit(f"--images must be 1..{len(names) * len(variants)}")
    images = []
    for suffix, transform in variants:
        for name in names:
            with Image.open(photo_dir() / name) as photo:
                images.append((transform(photo.convert("RGB")), PHOTO_CAPTIONS[name] + suffix))
    return images[:n_images]


def activations(tower: VisionTower, images: list[Image.Image]) -> dict[int, torch.Tensor]:
    """The residual stream after each of LAYERS as float32 (N, T, D), computed in batches."""
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in LAYERS}
    for start in range(0, len(images), BATCH):
        batch_BCHW = torch.stack([tower.preprocess(im) for im in images[start : start + BATCH]])
        for layer, acts_BTD in residual_stream(tower, batch_BCHW, list(LAYERS)).items():
            parts[layer].append(acts_BTD.float().clone())
    return {layer: torch.cat(tensors) for layer, tensors in parts.items()}


# ------------------------------------------------------------------------------- cache runs
def cache_attrs(run: Run, n_images: int) -> CacheAttrs:
    """One shard holding every image; R rounded up so that every chunk size divides it."""
    rows_per_shard = -(-n_images // max(CHUNK_SIZES)) * max(CHUNK_SIZES)
    return CacheAttrs(
        model=MODEL,
        pretrained=f"none:seed={SEED}",
        image_size=224,
        n_tokens=N_TOKENS,
        d_model=D_MODEL,
        n_blocks=24,
        layers=LAYERS,
        storage=run.storage,  # type: ignore[arg-type]
        codec=run.codec,
        chunk_images=run.chunk_images,
        rows_per_shard=rows_per_shard,
        shards=(SHARD,),
        model_dtype="float32",
        preprocess="bench",
    )


def chunks_of(acts_NTD: torch.Tensor, chunk_images: int) -> list[torch.Tensor]:
    """Whole chunks of C rows; a short tail chunk is padded with zeros, as the pipeline does."""
    chunks = []
    for first in range(0, len(acts_NTD), chunk_images):
        chunk_CTD = acts_NTD[first : first + chunk_images]
        if len(chunk_CTD) < chunk_images:
            pad = chunk_CTD.new_zeros((chunk_images - len(chunk_CTD), *chunk_CTD.shape[1:]))
            chunk_CTD = torch.cat([chunk_CTD, pad])
        chunks.append(chunk_CTD)
    return chunks


def timed_write(path: Path, attrs: CacheAttrs, acts: dict[int, torch.Tensor]) -> float:
    """Create a fresh cache and write every chunk of every layer; returns the seconds writing."""
    cache = create_or_open(path, attrs)
    chunks = {layer: chunks_of(acts[layer], attrs.chunk_images) for layer in LAYERS}
    gc.collect()
    start = time.perf_counter()
    for layer in LAYERS:
        for index, chunk_CTD in enumerate(chunks[layer]):
            cache.write_chunk(layer, index, chunk_CTD)
    return time.perf_counter() - start


def layer_bytes(path: Path) -> int:
    """Size of every file under the layer arrays (layer_LL, and layer_LL_scale for 8 bits)."""
    folders = [f for f in path.iterdir() if f.is_dir() and f.name.startswith("layer_")]
    return sum(f.stat().st_size for folder in folders for f in folder.rglob("*") if f.is_file())


def commit_shard(path: Path, attrs: CacheAttrs, captions: list[str]) -> None:
    """Commit the one shard with its row table, so that readers see its rows."""
    n = len(captions)
    rows = pa.table(
        {
            "row": list(range(n)),
            "shard": [SHARD] * n,
            "key": [f"{i:09d}" for i in range(n)],
            "url": [None] * n,
            "caption": captions,
            "status": ["ok"] * n,
            "error": [None] * n,
        },
        schema=ROWS_SCHEMA,
    )
    record = ShardCommit(
        shard=SHARD,
        index=0,
        first_row=0,
        n_rows=n,
        n_skipped=0,
        source_bytes=0,
        written_by=writer_id(),
        committed_at=utc_now(),
    )
    create_or_open(path, attrs).commit(record, rows)


def timed_read(path: Path) -> tuple[float, dict[int, torch.Tensor]]:
    """Read every committed chunk of every layer in stage two's random order; seconds, values."""
    cache = open_cache(path)
    refs = cache.chunks(order="random", seed=0)
    gc.collect()
    start = time.perf_counter()
    parts = {layer: [cache.read_chunk(layer, ref) for ref in refs] for layer in LAYERS}
    seconds = time.perf_counter() - start
    order = sorted(range(len(refs)), key=lambda i: refs[i].first_row)
    return seconds, {layer: torch.cat([p[i] for i in order]) for layer, p in parts.items()}


def measure_once(
    workdir: Path, run: Run, acts: dict[int, torch.Tensor], captions: list[str]
) -> dict[int, torch.Tensor]:
    """One repetition: write a fresh cache, size it, commit it, read it back; returns the values."""
    attrs = cache_attrs(run, len(captions))
    path = workdir / f"{run.storage}-{run.codec}-{run.chunk_images}"
    run.write_s.append(timed_write(path, attrs, acts))
    disk_bytes = layer_bytes(path)
    if run.disk_bytes not in (0, disk_bytes):
        raise AssertionError(f"{run.label}: {disk_bytes} bytes, {run.disk_bytes} before")
    run.disk_bytes = disk_bytes
    commit_shard(path, attrs, captions)
    seconds, decoded = timed_read(path)
    run.read_s.append(seconds)
    shutil.rmtree(path)
    return decoded


def sweep(
    workdir: Path,
    runs: list[Run],
    acts: dict[int, torch.Tensor],
    captions: list[str],
    repeats: int,
    check: Callable[[Run, dict[int, torch.Tensor]], None],
) -> None:
    """Every run once per repetition, interleaved, so that a noisy spell hits all settings alike."""
    for repeat in range(repeats):
        for run in runs:
            check(run, measure_once(workdir, run, acts, captions))
            print(
                f"[{repeat + 1}/{repeats}] {run.label:38} {run.bytes_per_value:.3f} B/value, "
                f"write {run.mbps(run.write_s[-1:]):5.0f} MB/s, "
                f"read {run.mbps(run.read_s[-1:]):5.0f} MB/s",
                flush=True,
            )


def require_equal(
    decoded: dict[int, torch.Tensor], expected: dict[int, torch.Tensor], what: str
) -> None:
    """Lossless codecs must decode to exactly the same values."""
    for layer in LAYERS:
        if not torch.equal(decoded[layer], expected[layer]):
            raise AssertionError(f"{what}: layer {layer} decodes to other values")


# ----------------------------------------------------------------------------------- errors
def squared_norms(decoded: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """(||decoded - exact||², ||exact||²) in float64, to be summed before dividing."""
    err = torch.linalg.vector_norm(decoded - exact, dtype=torch.float64).item()
    ref = torch.linalg.vector_norm(exact, dtype=torch.float64).item()
    return err**2, ref**2


def error_row(decoded: dict[int, torch.Tensor], exact: dict[int, torch.Tensor]) -> list[float]:
    """||decoded - exact|| / ||exact|| over all layers then each layer; all tokens, then CLS."""
    row = []
    for tokens in (slice(None), slice(0, 1)):
        norms = [squared_norms(decoded[lay][:, tokens], exact[lay][:, tokens]) for lay in LAYERS]
        row.append((sum(e for e, _ in norms) / sum(r for _, r in norms)) ** 0.5)
        row.extend((e / r) ** 0.5 for e, r in norms)
    return row


# ---------------------------------------------------------------------------------- picking
def pick_codec(runs: list[Run]) -> Run:
    """The default's codec: the float16 preset of lowest read cost at C=REFERENCE_CHUNK, or none
    unless that preset beats it by more than TOLERANCE."""
    at_chunk = [r for r in runs if r.chunk_images == REFERENCE_CHUNK]
    best = min(at_chunk, key=lambda r: r.read_cost)
    none = find(runs, "float16", "none", REFERENCE_CHUNK)
    return none if none.read_cost <= best.read_cost * (1 + TOLERANCE) else best


def pick_compressing(runs: list[Run]) -> Run:
    """The float16 preset that stores fewest bytes at C=REFERENCE_CHUNK (fastest read of those
    within SIZE_TIE of the smallest): the best that compression offers."""
    candidates = [r for r in runs if r.chunk_images == REFERENCE_CHUNK and r.codec != "none"]
    smallest = min(r.bytes_per_value for r in candidates)
    tied = [r for r in candidates if r.bytes_per_value <= smallest * (1 + SIZE_TIE)]
    return min(tied, key=lambda r: r.read_cost)


def pick_chunk(runs: list[Run], codec: str) -> tuple[Run, Run]:
    """The default's chunk size for `codec`: REFERENCE_CHUNK unless another size reads more than
    TOLERANCE cheaper; returned with the size of lowest read cost."""
    best = min((r for r in runs if r.codec == codec), key=lambda r: r.read_cost)
    reference = find(runs, "float16", codec, REFERENCE_CHUNK)
    return (reference if reference.read_cost <= best.read_cost * (1 + TOLERANCE) else best), best


def find(runs: list[Run], storage: str, codec: str, chunk_images: int) -> Run:
    return next(
        r for r in runs if (r.storage, r.codec, r.chunk_images) == (storage, codec, chunk_images)
    )


def machine_busy_s() -> float:
    """CPU seconds used so far by every process on the machine, steal included (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_busy_s() -> float:
    times = os.times()
    return times.user + times.system


def other_load(since: tuple[float, float, float]) -> str:
    """How many CPUs other processes kept busy on average since `since` (wall, machine, own)."""
    wall, machine, own = since
    others = (machine_busy_s() - machine) - (own_busy_s() - own)
    return f"{max(others, 0.0) / (time.perf_counter() - wall):.2f}"


# --------------------------------------------------------------------------------- markdown
def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def shell(command: list[str]) -> str:
    """A command's output, or '?' where it cannot run."""
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def machine_lines(workdir: Path) -> list[str]:
    lscpu = shell(["lscpu"]).splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu if "Model name" in line), "?")
    fs_type = shell(["stat", "-f", "-c", "%T", str(workdir.parent)])
    versions = (
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"zarr {zarr.__version__}, numcodecs {numcodecs.__version__}"
    )
    return [
        f"- Date: {shell(['date', '-u'])}",
        f"- CPU: {cpu}; {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
        f"torch threads {torch.get_num_threads()}; no GPU",
        f"- Caches written under {workdir.parent} ({fs_type})",
        f"- {versions}",
    ]


def command_line() -> str:
    python = Path(sys.executable)
    if python.is_relative_to(Path.cwd()):
        python = python.relative_to(Path.cwd())
    return " ".join([str(python), *sys.argv])


def stats_table(acts: dict[int, torch.Tensor]) -> str:
    rows = []
    for layer, acts_NTD in acts.items():
        rms_T = acts_NTD.pow(2).mean(dim=(0, 2)).sqrt()
        rms, peak = acts_NTD.pow(2).mean().sqrt(), acts_NTD.abs().max()
        cells = [rms, peak, rms_T[0], rms_T[1:].mean()]
        rows.append([str(layer), *(f"{float(v):.3g}" for v in cells)])
    return md_table(["layer", "RMS", "max abs", "CLS RMS", "patch RMS"], rows)


def runs_table(runs: list[Run], first_column: str) -> str:
    header = [
        first_column,
        "C",
        "bytes/value",
        "ratio vs raw f16",
        "write MB/s",
        "read MB/s",
        "read cost s/GB",
    ]
    rows = [
        [
            r.codec if first_column == "codec" else f"{r.storage} + {r.codec}",
            str(r.chunk_images),
            f"{r.bytes_per_value:.3f}",
            f"{r.ratio:.3f}",
            r.mbps_cell(r.write_s),
            r.mbps_cell(r.read_s),
            f"{r.read_cost:.2f}",
        ]
        for r in runs
    ]
    return md_table(header, rows)


def error_table(errors: dict[str, list[float]]) -> str:
    layers = [f"L{layer}" for layer in LAYERS]
    header = ["storage", "all", *layers, "CLS all", *(f"CLS {name}" for name in layers)]
    return md_table(header, [[name, *(f"{e:.2e}" for e in row)] for name, row in errors.items()])


def break_even_gbps(compressed: Run, raw: Run) -> float:
    """Disk GB/s (per decoding thread) below which `compressed` has the lower read cost."""
    saving = 1 - compressed.bytes_per_value / raw.bytes_per_value
    extra_decode_s = 1e3 / compressed.best_read_mbps - 1e3 / raw.best_read_mbps
    return float("inf") if extra_decode_s <= 0 else saving / extra_decode_s


def break_even_sentence(compressed: Run, raw: Run) -> str:
    gbps = break_even_gbps(compressed, raw)
    if gbps == float("inf"):
        return f"Here {compressed.codec} even decodes faster than raw float16 reads."
    return (
        f"By the read-cost model {compressed.codec} pays only where each decoding thread gets "
        f"less than about {gbps:.2f} GB/s from storage, or where disk space itself is the "
        "constraint."
    )


def conclusions(runs: list[Run], eight: list[Run], errors: dict[str, list[float]]) -> str:
    """Sentences computed from the numbers with the rules stated in the report."""
    pick, best = pick_chunk(runs, pick_codec(runs).codec)
    squeeze = pick_compressing(runs)
    none = find(runs, "float16", "none", REFERENCE_CHUNK)
    terabytes = WORKLOAD_TOKENS * D_MODEL / 1e12
    files = WORKLOAD_TOKENS / N_TOKENS / pick.chunk_images / 1e3
    chunk_mb = pick.chunk_images * N_TOKENS * D_MODEL * 2 / 1e6
    mine = sorted((r for r in runs if r.codec == pick.codec), key=lambda r: r.chunk_images)
    by_chunk = ", ".join(f"{r.read_cost:.2f} (C={r.chunk_images})" for r in mine)
    if pick is best:
        why = f"C={pick.chunk_images} reads cheapest"
    elif pick.chunk_images == REFERENCE_CHUNK:
        why = (
            f"C={pick.chunk_images} is within {TOLERANCE:.0%} of the cheapest, "
            f"C={best.chunk_images}, a difference this machine cannot resolve, and is the middle "
            "ground between shuffle quality and memory (smaller chunks) and fewer files (bigger)"
        )
    else:
        why = f"C={pick.chunk_images} reads over {TOLERANCE:.0%} cheaper than C={REFERENCE_CHUNK}"
    saving = 1 - squeeze.bytes_per_value / none.bytes_per_value
    verdict = "barely compress" if saving < 0.15 else "compress"
    eight_bit = [r for r in eight if r.storage in EIGHT_BIT_STORAGES]
    cheapest = min(eight_bit, key=lambda r: r.read_cost)
    smallest = min(eight_bit, key=lambda r: r.bytes_per_value)
    sentences = [
        f"Default by the read-cost rule: **{pick.codec} with chunk_images={pick.chunk_images}** "
        f"({chunk_mb:.1f} MB chunks, {files:.0f} k chunk files per layer for "
        f"{WORKLOAD_TOKENS:.1e} tokens): its read cost in s/GB by chunk size is {by_chunk}; "
        f"{why}.",
        f"Float16 activations {verdict} losslessly: the best compressing preset, "
        f"{squeeze.codec}, stores {squeeze.bytes_per_value:.3f} bytes/value ({saving:.0%} less "
        f"than raw float16, {saving * none.bytes_per_value * terabytes:.2f} of "
        f"{none.bytes_per_value * terabytes:.2f} TB per layer of the workload) and reads at "
        f"up to {squeeze.best_read_mbps:.0f} MB/s against up to {none.best_read_mbps:.0f} MB/s "
        "uncompressed.",
        break_even_sentence(squeeze, none),
        "Where bytes matter, 8-bit storage does what codecs cannot: "
        f"{cheapest.storage} + {cheapest.codec} stores {cheapest.bytes_per_value:.3f} "
        f"bytes/value at a read cost of {cheapest.read_cost:.2f} s/GB (float16 + none: "
        f"{none.read_cost:.2f}), {smallest.storage} + {smallest.codec} "
        f"{smallest.bytes_per_value:.3f} bytes/value, with relative errors of "
        f"{errors['int8'][0]:.1e} (int8) and {errors['float8_e4m3'][0]:.1e} (float8_e4m3; CLS "
        f"token {errors['int8'][4]:.1e} and {errors['float8_e4m3'][4]:.1e}) against float16's "
        f"{errors['float16'][0]:.1e}, which should be tested on SAE training with real weights "
        "before it becomes a default.",
    ]
    return " ".join(sentences)


def report(
    acts: dict[int, torch.Tensor],
    runs: list[Run],
    eight: list[Run],
    errors: dict[str, list[float]],
    args: argparse.Namespace,
    workdir: Path,
    forward_s: float,
    load_note: str,
) -> str:
    n_values = runs[0].n_values
    squeeze = pick_compressing(runs).codec
    setup = (
        f"Activations: {MODEL} from `load_vision_tower(..., 'none', seed={SEED})`, that is "
        "**random seeded weights**: no weights can be downloaded on this machine, so these are "
        "not CLIP's activations (trained ViTs have outlier channels and high-norm tokens that "
        "random ones lack, so ratios and 8-bit errors may differ with real weights). "
        f"{args.images} images (scikit-image's {len(PHOTO_CAPTIONS)} photos, then mirrored, "
        "then 75% crops) through open_clip's preprocessing; residual stream after blocks "
        f"{', '.join(map(str, LAYERS))}, float32 forward in batches of {BATCH} "
        f"({forward_s:.0f} s). Each cache holds {args.images} × {N_TOKENS} × {D_MODEL} × "
        f"{len(LAYERS)} = {n_values:,} values ({n_values * 2 / 1e6:.0f} MB as raw float16)."
    )
    if args.images % max(CHUNK_SIZES):
        setup += " Tail chunks are padded with zeros, which inflates the bigger chunks' bytes."
    method = (
        "Each repetition creates a cache with `create_or_open` in a fresh directory and writes "
        "every chunk of every layer with `Cache.write_chunk` (timed, including the encoding; "
        "writes land in the page cache, no fsync). Bytes on disk are the file sizes under the "
        "`layer_LL` folders (and `layer_LL_scale` for 8 bits). After `commit`, "
        "`open_cache(path).read_chunk(layer, ref)` reads every chunk in `chunks(order='random')` "
        "order, decoding to float32 (timed). **Reads come from the page cache** (the files were "
        "just written), so read MB/s measures decompression and decoding, not a disk, one chunk "
        "at a time, as `read_chunk` does. MB/s count raw float16 bytes "
        f"({n_values * 2 / 1e6:.0f} MB / seconds) and are medians of {args.repeats} repetitions, "
        "shown as median (slowest–fastest); repetitions are interleaved across settings. "
        f"**Read cost** = seconds per raw float16 GB to fetch the stored bytes at {DISK_GBPS:g} "
        f"GB/s with {CHUNK_LATENCY_S * 1e3:g} ms per chunk file (a shared file system's or object "
        "store's request latency, which the page cache hides) plus to decode them at the "
        "fastest measured read speed (the repetition least slowed by other jobs). "
        "The default is picked by it: the preset of lowest read cost at "
        f"C={REFERENCE_CHUNK}, or none unless that preset is more than {TOLERANCE:.0%} cheaper, "
        f"then C={REFERENCE_CHUNK} unless another chunk size is more than {TOLERANCE:.0%} "
        "cheaper. The machine is a shared VM: "
        f"{load_note}"
    )
    return "\n\n".join(
        [
            "# Cache compression presets and chunk sizes",
            f"Command: `{command_line()}`",
            "\n".join(machine_lines(workdir)),
            "## Setup",
            setup,
            method,
            "Activation statistics (float32):",
            stats_table(acts),
            "## float16: codec × chunk size",
            runs_table(runs, "codec"),
            f"## 8-bit storage at C={REFERENCE_CHUNK}",
            f"With the best compressing float16 preset at C={REFERENCE_CHUNK} (**{squeeze}**: "
            f"fewest bytes, the fastest read among presets within {SIZE_TIE:.1%} of that size) "
            "and with none; the float16 rows are those of the table above. "
            "8-bit bytes include the float32 scales (one per channel per chunk).",
            runs_table(eight, "storage + codec"),
            "Relative error ||decoded − exact|| / ||exact|| against the float32 activations, over "
            "all layers, then per layer, for all tokens and for the CLS token (token 0) alone. "
            "Codecs are lossless: every preset's decoded values were checked equal.",
            error_table(errors),
            "## Conclusions",
            conclusions(runs, eight, errors),
            "",
        ]
    )


# ------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images to encode (1..96)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median)")
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results/codecs.md"), help="markdown report"
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def float16_sweep(
    workdir: Path, acts: dict[int, torch.Tensor], captions: list[str], repeats: int
) -> list[Run]:
    n_values = len(captions) * N_TOKENS * D_MODEL * len(LAYERS)
    runs = [Run("float16", codec, c, n_values) for codec in CODECS for c in CHUNK_SIZES]
    exact16 = {layer: a.half().float() for layer, a in acts.items()}
    sweep(workdir, runs, acts, captions, repeats, lambda r, d: require_equal(d, exact16, r.label))
    return runs


def eight_bit_sweep(
    workdir: Path, acts: dict[int, torch.Tensor], captions: list[str], repeats: int, codec: str
) -> tuple[list[Run], dict[str, dict[int, torch.Tensor]]]:
    """8-bit runs with `codec` and with none, and each storage's decoded values."""
    n_values = len(captions) * N_TOKENS * D_MODEL * len(LAYERS)
    runs = [
        Run(storage, name, REFERENCE_CHUNK, n_values)
        for storage in EIGHT_BIT_STORAGES
        for name in dict.fromkeys([codec, "none"])
    ]
    decoded: dict[str, dict[int, torch.Tensor]] = {}

    def check(run: Run, values: dict[int, torch.Tensor]) -> None:
        if run.storage in decoded:
            require_equal(values, decoded[run.storage], run.label)
        else:
            decoded[run.storage] = values

    sweep(workdir, runs, acts, captions, repeats, check)
    return runs, decoded


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    images = bench_images(args.images)
    captions = [caption for _, caption in images]
    tower = load_vision_tower(MODEL, "none", "cpu", "float32", seed=SEED)
    forward_start = time.perf_counter()
    acts = activations(tower, [image for image, _ in images])
    forward_s = time.perf_counter() - forward_start
    del tower
    print(f"activations of {args.images} images in {forward_s:.0f} s", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="vitscope-bench-codecs-"))
    since = (time.perf_counter(), machine_busy_s(), own_busy_s())
    try:
        runs = float16_sweep(workdir, acts, captions, args.repeats)
        codec = pick_compressing(runs).codec
        eight, decoded = eight_bit_sweep(workdir, acts, captions, args.repeats, codec)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load_note = (
        f"the timed part took {time.perf_counter() - since[0]:.0f} s, during which other "
        f"processes kept {other_load(since)} of its {os.cpu_count()} CPUs busy on average."
    )
    errors = {"float16": error_row({k: a.half().float() for k, a in acts.items()}, acts)}
    errors.update({storage: error_row(values, acts) for storage, values in decoded.items()})
    float16_rows = [
        r for r in runs if r.chunk_images == REFERENCE_CHUNK and r.codec in (codec, "none")
    ]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = report(acts, runs, float16_rows + eight, errors, args, workdir, forward_s, load_note)
    args.out.write_text(text)
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
