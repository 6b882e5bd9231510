"""Stage one's cost against a bare forward pass of the same model on the same images, as a ratio.

Why: the cache must cost at most 10% over running the model alone. This script measures both in one
process, on the same images, alternating them, and writes a markdown table:

  (a)  bare forward: the cache's own DataLoader (`ShardImages` + `shard_loader`, same batch size and
       workers) feeding `residual_stream(tower, images, layers)`, writing nothing;
  (a2) `tower.visual(images)`, the whole tower, on images decoded beforehand into memory;
  (a3) `residual_stream` on the same in-memory images: (a) without its data loading;
  (b)  `vitscope.pipeline.run.cache(CacheConfig(...))` into a fresh cache directory.

The tower is loaded once. (b) gets that same tower through a patched `run.load_vision_tower` (no
pipeline code changes), so neither (a) nor (b) includes model loading; (b) does include creating
the cache, its DataLoader, the writes, row tables and commits. A serial split (decode, forward,
encode, compress + write, each alone on the main thread) shows where (b)'s extra time goes.

The images are img2dataset-shaped webdataset shards made from scikit-image's photos
(`bench/photo_shards.py`). Without downloaded weights the model has seeded random weights: the same
arithmetic, so the same speed.

Run (CPU defaults: ViT-B-32, its CLIP-Scope layers 2,5,8,11, 128 images):

    .venv/bin/python bench/cache_throughput.py
    .venv/bin/python bench/cache_throughput.py --model ViT-L-14 --images 32 --batch-size 8 --append

On a GPU node (ViT-L-14's eight CLIP-Scope layers, bfloat16 by default on CUDA):

    .venv/bin/python bench/cache_throughput.py --model ViT-L-14 --images 2048 --batch-size 64 \
        --num-workers 8 --shard-size 512 --out bench/results/cache_throughput_gpu.md
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numcodecs
import torch
import zarr
from photo_shards import write_photo_shards

from vitscope.cache_spec.layout import CLIP_SCOPE_LAYERS
from vitscope.cache_spec.storage import ENCODINGS
from vitscope.cache_spec.store import create_or_open
from vitscope.demo import DEMO_PRETRAINED, demo_weights
from vitscope.pipeline import run as run_module
from vitscope.pipeline.config import CacheConfig
from vitscope.pipeline.dataset import ShardImages, shard_loader
from vitscope.pipeline.model import (
    VisionTower,
    import_open_clip,
    load_vision_tower,
    residual_stream,
)
from vitscope.pipeline.run import cache, cache_attrs, resolve_device

LIMIT = 1.10
"""The requirement: the cache may take at most 10% longer than the bare forward pass."""

DEFAULT_OUT = Path(__file__).parent / "results" / "cache_throughput.md"


@dataclass(frozen=True)
class Setup:
    """Everything a measurement needs: the tower, the shards, and the run's settings."""

    tower: VisionTower
    shards: list[Path]
    layers: list[int]
    config: CacheConfig
    workdir: Path
    shard_sizes: list[int]

    @property
    def n_images(self) -> int:
        return sum(self.shard_sizes)

    @property
    def raw_bytes(self) -> int:
        """Activation bytes the cache stores for all images, before compression."""
        per_value = ENCODINGS[self.config.storage].bytes_per_value
        tower = self.tower
        return self.n_images * len(self.layers) * tower.n_tokens * tower.d_model * per_value

    @property
    def n_chunks(self) -> int:
        """Chunk files the run writes: each shard's images in whole chunks, in every layer."""
        per_chunk = self.config.chunk_images
        return sum(math.ceil(n / per_chunk) for n in self.shard_sizes) * len(self.layers)


@dataclass(frozen=True)
class Measurement:
    """One timed run: wall seconds, this process's CPU seconds, and everyone else's meanwhile."""

    wall: float
    cpu: float
    """CPU seconds of this process and its finished children (the DataLoader workers)."""
    other: float | None
    """CPU seconds the rest of the machine used meanwhile (other processes, hypervisor steal);
    None where /proc/stat is missing. On a shared machine this says which repeats were disturbed."""

    def __str__(self) -> str:
        others = "?" if self.other is None else f"{self.other:.1f}"
        return f"{self.wall:.2f}s (CPU {self.cpu:.1f}s, others' CPU {others}s)"


@dataclass
class Timings:
    """Measurements per repeat: (a), (a2), (a3), (b); plus what the cache runs wrote to disk."""

    bare: list[Measurement] = dataclasses.field(default_factory=list)
    full_in_memory: list[Measurement] = dataclasses.field(default_factory=list)
    stream_in_memory: list[Measurement] = dataclasses.field(default_factory=list)
    cache: list[Measurement] = dataclasses.field(default_factory=list)
    cache_reported: list[float] = dataclasses.field(default_factory=list)
    disk_bytes: int = 0


def median_wall(measurements: list[Measurement]) -> float:
    return statistics.median(m.wall for m in measurements)


@dataclass(frozen=True)
class Split:
    """Each stage alone on the main thread, for all the run's images."""

    decode: Measurement
    encode: Measurement
    encode_and_write: Measurement

    @property
    def write(self) -> float:
        """Seconds compressing and writing: encode + write, less encode."""
        return max(self.encode_and_write.wall - self.encode.wall, 0.0)


# ---------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = CacheConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name")
    parser.add_argument(
        "--pretrained",
        default="auto",
        help="open_clip tag, weights file, 'none' (seeded random weights), or 'auto': the demo's "
        "tag when its weights are in the local hub cache, else 'none'",
    )
    parser.add_argument(
        "--layers",
        default=None,
        help="comma-separated blocks; default: the CLIP-Scope layers (2,5,...,22) the model has",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument(
        "--model-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )
    parser.add_argument("--images", type=int, default=128, help="distinct images to encode")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers)
    parser.add_argument("--write-threads", type=int, default=defaults.write_threads)
    parser.add_argument("--shard-size", type=int, default=64, help="samples per input shard")
    parser.add_argument("--chunk-images", type=int, default=defaults.chunk_images)
    parser.add_argument("--storage", default=defaults.storage)
    parser.add_argument("--codec", default=defaults.codec)
    parser.add_argument("--repeats", type=int, default=3, help="alternating (a)/(b) repeats")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="seconds to wait, before each measurement, for other processes to quiet down",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown results file")
    parser.add_argument(
        "--append", action="store_true", help="add this run's section to --out instead of replacing"
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="shards and caches go here (default: temp dir)"
    )
    args = parser.parse_args(argv)
    if args.images < 1 or args.batch_size < 1 or args.shard_size < 1 or args.repeats < 1:
        parser.error("--images, --batch-size, --shard-size and --repeats must be at least 1")
    return args


def default_layers(n_blocks: int) -> list[int]:
    """CLIP-Scope's layers that exist in the model: all eight for ViT-L-14, 2,5,8,11 for ViT-B."""
    layers = [layer for layer in CLIP_SCOPE_LAYERS if layer < n_blocks]
    return layers or [n_blocks - 1]


def resolve_pretrained(model: str, pretrained: str) -> str:
    if pretrained != "auto":
        return pretrained
    tag = DEMO_PRETRAINED.get(model)
    return demo_weights(model, tag) if tag else "none"


def rows_per_shard(shard_size: int, chunk_images: int) -> int:
    """The smallest R that holds a shard and is a multiple of C, as the spec requires."""
    return math.ceil(shard_size / chunk_images) * chunk_images


# ---------------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores have spent busy since boot (Linux), steal time included."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def timed(fn: Callable[[], object], device: torch.device) -> Measurement:
    """Time fn(), with the GPU's queued work finished before the clock stops."""
    sync(device)
    busy, own = machine_busy_seconds(), own_cpu_seconds()
    start = time.perf_counter()
    fn()
    sync(device)
    wall = time.perf_counter() - start
    cpu = own_cpu_seconds() - own
    busy_after = machine_busy_seconds()
    other = None if busy is None or busy_after is None else max(busy_after - busy - cpu, 0.0)
    return Measurement(wall, cpu, other)


def wait_for_quiet(max_wait: float, threshold: float = 0.25) -> None:
    """On a shared machine, wait (up to max_wait s) until others use < threshold of a core."""
    deadline = time.perf_counter() + max_wait
    while True:
        load = timed(lambda: time.sleep(1.0), torch.device("cpu")).other
        if load is None or load < threshold or time.perf_counter() > deadline:
            if load is not None and load >= threshold:
                log(f"machine still busy ({load:.2f} cores used by others); measuring anyway")
            return


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def tree_bytes(path: Path, prefix: str = "layer_") -> int:
    """Bytes on disk of the layer arrays of a cache (chunk files and their zarr.json)."""
    return sum(
        f.stat().st_size
        for d in path.iterdir()
        if d.is_dir() and d.name.startswith(prefix)
        for f in d.rglob("*")
        if f.is_file()
    )


@contextmanager
def preloaded_tower(tower: VisionTower) -> Iterator[None]:
    """Make `cache()` use the tower already in memory instead of loading the model again."""
    original = run_module.load_vision_tower

    def reuse(model: str, pretrained: str, device: str = "cpu", *args: object) -> VisionTower:
        if model != tower.model or torch.device(device) != tower.device:
            raise RuntimeError(f"cache() asked for {model} on {device}, not the preloaded tower")
        return tower

    run_module.load_vision_tower = reuse  # type: ignore[assignment]
    try:
        yield
    finally:
        run_module.load_vision_tower = original


# ---------------------------------------------------------------------------------- measurements
def bare_forward(setup: Setup) -> Measurement:
    """(a): the cache's DataLoader and forward pass, activations dropped."""
    tower, config = setup.tower, setup.config
    dataset = ShardImages(
        list(enumerate(setup.shards)), tower.preprocess, config.batch_size, tower.image_size
    )
    loader = shard_loader(dataset, config.num_workers, pin_memory=tower.device.type == "cuda")

    def run() -> None:
        n_images = 0
        for batch in loader:
            if batch.n_images:
                residual_stream(tower, batch.images_BCHW, setup.layers)
                n_images += batch.n_images
        assert n_images == setup.n_images, (n_images, setup.n_images)

    return timed(run, tower.device)


def decode_in_memory(setup: Setup) -> list[torch.Tensor]:
    """All images decoded and preprocessed in this process, in the cache's batches."""
    tower = setup.tower
    dataset = ShardImages(
        list(enumerate(setup.shards)), tower.preprocess, setup.config.batch_size, tower.image_size
    )
    return [batch.images_BCHW for batch in dataset if batch.n_images]


@torch.inference_mode()
def full_forward(tower: VisionTower, batches: list[torch.Tensor]) -> Measurement:
    """(a2): the whole tower (every block, ln_post, projection) on in-memory images."""

    def run() -> None:
        for images in batches:
            tower.visual(images.to(device=tower.device, dtype=tower.dtype, non_blocking=True))

    return timed(run, tower.device)


def stream_forward(
    tower: VisionTower, batches: list[torch.Tensor], layers: list[int]
) -> Measurement:
    """(a3): residual_stream on in-memory images, the compute floor of (a) and (b)."""

    def run() -> None:
        for images in batches:
            residual_stream(tower, images, layers)

    return timed(run, tower.device)


def cache_run(setup: Setup, repeat: int) -> tuple[Measurement, float, int]:
    """(b): a whole `cache()` into a fresh directory; (timing, cache()'s own s, bytes on disk)."""
    out = setup.workdir / f"cache_{repeat}"
    shutil.rmtree(out, ignore_errors=True)
    config = dataclasses.replace(setup.config, out=str(out))
    result: list[run_module.CacheRunSummary] = []
    with preloaded_tower(setup.tower):
        measurement = timed(lambda: result.append(cache(config)), setup.tower.device)
    summary = result[0]
    if summary.failed or summary.rows != setup.n_images:
        raise RuntimeError(f"cache run went wrong: {summary.lines()}")
    disk = tree_bytes(out)
    shutil.rmtree(out, ignore_errors=True)
    return measurement, summary.seconds, disk


def split_chunks(setup: Setup, images: torch.Tensor) -> dict[int, torch.Tensor]:
    """One chunk per layer of real activations (a batch repeated if it is smaller than C)."""
    per_chunk = setup.config.chunk_images
    chunks = {}
    for layer, rows in residual_stream(setup.tower, images, setup.layers).items():
        repeats = math.ceil(per_chunk / rows.shape[0])
        chunks[layer] = (torch.cat([rows] * repeats) if repeats > 1 else rows)[:per_chunk]
    return chunks


def serial_split(setup: Setup, batches: list[torch.Tensor], decode: Measurement) -> Split:
    """Encode, and encode + compress + write, every chunk of the run alone on the main thread.

    The chunks are written into a scratch cache at the run's own chunk indices: the work of (b)'s
    writer threads, without the forward pass beside it.
    """
    tower, config = setup.tower, setup.config
    chunks = split_chunks(setup, batches[0])
    n_per_layer = setup.n_chunks // len(setup.layers)
    encoding = ENCODINGS[config.storage]
    scratch = setup.workdir / "split_cache"
    shutil.rmtree(scratch, ignore_errors=True)
    store = create_or_open(scratch, cache_attrs(config, tower, [p.name for p in setup.shards]))

    def encode_all() -> None:
        for _ in range(n_per_layer):
            for chunk in chunks.values():
                encoding.encode(chunk)

    def write_all() -> None:
        for index in range(n_per_layer):
            for layer, chunk in chunks.items():
                store.write_chunk(layer, index, chunk)

    encode_all()  # warm-up: the first calls into the codecs and zarr
    write_all()
    encode = timed(encode_all, tower.device)
    encode_and_write = timed(write_all, tower.device)
    shutil.rmtree(scratch, ignore_errors=True)
    return Split(decode, encode, encode_and_write)


def measure(setup: Setup, repeats: int, quiet_wait: float) -> tuple[Timings, Split]:
    tower = setup.tower
    batches: list[torch.Tensor] = []
    decode = timed(lambda: batches.extend(decode_in_memory(setup)), torch.device("cpu"))
    log(f"decoded {setup.n_images} images in-process in {decode.wall:.2f}s")
    with torch.inference_mode():  # warm-up: one batch through both forward paths
        tower.visual(batches[0].to(device=tower.device, dtype=tower.dtype))
    stream_forward(tower, batches[:1], setup.layers)
    wait_for_quiet(quiet_wait)
    split = serial_split(setup, batches, decode)
    log(f"split: encode {split.encode.wall:.2f}s, compress+write {split.write:.2f}s")
    timings = Timings()
    for repeat in range(repeats):
        order = ("a", "b") if repeat % 2 == 0 else ("b", "a")  # ABBA against drift
        for which in order:
            wait_for_quiet(quiet_wait)
            if which == "a":
                timings.bare.append(bare_forward(setup))
                log(f"repeat {repeat}: (a) bare forward {timings.bare[-1]}")
            else:
                measurement, reported, disk = cache_run(setup, repeat)
                timings.cache.append(measurement)
                timings.cache_reported.append(reported)
                timings.disk_bytes = disk
                log(f"repeat {repeat}: (b) cache {measurement}")
        wait_for_quiet(quiet_wait)
        timings.full_in_memory.append(full_forward(tower, batches))
        timings.stream_in_memory.append(stream_forward(tower, batches, setup.layers))
        log(f"repeat {repeat}: (a2) {timings.full_in_memory[-1]}")
        log(f"repeat {repeat}: (a3) {timings.stream_in_memory[-1]}")
    return timings, split


# ---------------------------------------------------------------------------------- report
def machine_lines(device: torch.device) -> list[str]:
    cpu = platform.processor() or "?"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU run)"
    open_clip = import_open_clip()
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores visible, torch intra-op threads "
        f"{torch.get_num_threads()}",
        f"- GPU: {gpu}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, open_clip "
        f"{open_clip.__version__}, zarr {zarr.__version__}, numcodecs {numcodecs.__version__}",
    ]


def utc_date() -> str:
    try:
        return subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return datetime.now(timezone.utc).isoformat(timespec="seconds")


def command_line() -> str:
    python = Path(sys.executable)
    with_venv = Path(".venv/bin/python")
    shown = str(with_venv) if with_venv.exists() and with_venv.absolute() == python else "python"
    return shlex.join([shown, *sys.argv])


def rate_row(name: str, runs: list[Measurement], setup: Setup, base: float, disk: int) -> str:
    seconds = median_wall(runs)
    raw = setup.raw_bytes / seconds / 1e6
    on_disk = f"{disk / seconds / 1e6:.1f}" if disk else "–"
    return (
        f"| {name} | {seconds:.2f} | {setup.n_images / seconds:.1f} | {raw:.1f} | {on_disk} "
        f"| {seconds / base:.3f} |"
    )


def other_cpu(m: Measurement) -> str:
    return "?" if m.other is None else f"{m.other:.1f}"


def repeat_rows(timings: Timings) -> list[str]:
    rows = [
        "| repeat | (a) s | (b) s | (b)/(a) | (a) CPU s | (b) CPU s | others' CPU s in (a), (b) "
        "| (a2) s | (a3) s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    runs = zip(
        timings.bare, timings.cache, timings.full_in_memory, timings.stream_in_memory, strict=True
    )
    for i, (a, b, a2, a3) in enumerate(runs):
        rows.append(
            f"| {i} | {a.wall:.2f} | {b.wall:.2f} | {b.wall / a.wall:.3f} | {a.cpu:.1f} "
            f"| {b.cpu:.1f} | {other_cpu(a)}, {other_cpu(b)} | {a2.wall:.2f} | {a3.wall:.2f} |"
        )
    return rows


def split_rows(setup: Setup, split: Split, forward: float) -> list[str]:
    storage = setup.config.storage
    stages = [
        ("decode + preprocess (in-process, no workers)", split.decode.wall),
        (f"forward to layer {max(setup.layers)} (a3, median)", forward),
        (f"encode: finite/range checks + {storage}", split.encode.wall),
        (f"compress + write {setup.n_chunks} chunks (zarr)", split.write),
    ]
    return [
        "| stage | seconds | vs forward (a3) |",
        "| --- | ---: | ---: |",
        *(f"| {name} | {sec:.2f} | {sec / forward:.1%} |" for name, sec in stages),
    ]


def diagnosis(setup: Setup, timings: Timings, split: Split, ratio: float) -> list[str]:
    """A few sentences on where (b)'s extra time goes, from the serial split."""
    bare, cached = median_wall(timings.bare), median_wall(timings.cache)
    forward = median_wall(timings.stream_in_memory)
    extra = split.encode.wall + split.write
    verdict = "within" if ratio <= LIMIT else "over"
    lines = [
        f"The cache took {cached - bare:+.2f}s ({ratio:.3f}×) against the bare forward pass: "
        f"{verdict} the {LIMIT:.2f}× limit. Alone on the main thread, the cache's own work for "
        f"these {setup.n_images} images is {split.encode.wall:.2f}s encoding and "
        f"{split.write:.2f}s compressing and writing, {extra / forward:.1%} of the forward "
        f"pass's {forward:.2f}s; decoding takes {split.decode.wall:.2f}s serially, and going "
        f"through the DataLoader costs (a) {bare - forward:+.2f}s over in-memory images (a3).",
    ]
    if ratio > LIMIT:
        biggest = "compressing and writing" if split.write >= split.encode.wall else "encoding"
        lines.append(
            f"On {os.cpu_count()} core(s) the writer threads and DataLoader workers compete with "
            f"the forward pass for the same cores, so the cache's work adds to the forward pass "
            f"instead of hiding behind it; {biggest} is the larger part. On a GPU the forward "
            "pass leaves the cores free and this work overlaps it; on a CPU, fewer "
            "--write-threads/--num-workers than cores or a cheaper --codec would cut it."
        )
    return lines


def report(args: argparse.Namespace, setup: Setup, timings: Timings, split: Split) -> str:
    tower, config = setup.tower, setup.config
    bare = median_wall(timings.bare)
    ratio = median_wall(timings.cache) / bare
    pairs = [b.wall / a.wall for a, b in zip(timings.bare, timings.cache, strict=True)]
    cpu_ratio = statistics.median(m.cpu for m in timings.cache) / statistics.median(
        m.cpu for m in timings.bare
    )
    workers = min(config.num_workers, len(setup.shards))
    forward = median_wall(timings.stream_in_memory)
    return "\n".join(
        [
            f"## {tower.model}, layers {','.join(map(str, setup.layers))}, {tower.device.type}, "
            f"{str(tower.dtype).removeprefix('torch.')}",
            "",
            "```",
            command_line(),
            "```",
            "",
            f"- Date: {utc_date()}",
            *machine_lines(tower.device),
            f"- Weights: {tower.pretrained}; T={tower.n_tokens}, D={tower.d_model}, "
            f"{tower.n_blocks} blocks",
            f"- {setup.n_images} distinct images (scikit-image photos, cropped/flipped, 224 px "
            f"JPEG) in {len(setup.shards)} shard(s) of up to {args.shard_size}; batch "
            f"{config.batch_size}, {workers} DataLoader worker(s) (--num-workers "
            f"{config.num_workers}, one per shard at most), {config.write_threads} write threads, "
            f"chunks of {config.chunk_images} images, storage {config.storage}, codec "
            f"{config.codec}",
            f"- {args.repeats} repeat(s), (a) and (b) alternating (ABBA), each after waiting up to "
            f"{args.quiet_wait:.0f}s for other processes to use < 0.25 core; medians below. Model "
            "loading is excluded everywhere: (b) runs the real `cache()` with the already loaded "
            "tower patched in for `load_vision_tower`.",
            "",
            f"**Ratio (b)/(a) = {ratio:.3f}** (limit {LIMIT:.2f}: "
            f"{'PASS' if ratio <= LIMIT else 'FAIL'}); per repeat "
            + ", ".join(f"{p:.3f}" for p in pairs)
            + f"; CPU seconds (b)/(a) {cpu_ratio:.3f}.",
            "",
            "| measurement | median s | images/s | activations MB/s (raw) | on disk MB/s | "
            "vs (a) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            rate_row("(a) bare forward, cache's DataLoader", timings.bare, setup, bare, 0),
            rate_row("(a2) `tower.visual`, in-memory", timings.full_in_memory, setup, bare, 0),
            rate_row("(a3) `residual_stream`, in-memory", timings.stream_in_memory, setup, bare, 0),
            rate_row("(b) `cache()`", timings.cache, setup, bare, timings.disk_bytes),
            "",
            f"Raw activations: {setup.raw_bytes / 1e6:.1f} MB ({setup.n_images} images × "
            f"{len(setup.layers)} layers × {tower.n_tokens} × {tower.d_model} × "
            f"{ENCODINGS[config.storage].bytes_per_value} B); on disk "
            f"{timings.disk_bytes / 1e6:.1f} MB ({timings.disk_bytes / setup.raw_bytes:.1%}). "
            f"`cache()`'s own summary.seconds, median: "
            f"{statistics.median(timings.cache_reported):.2f}s.",
            "",
            "Per repeat (CPU s: this process and its DataLoader workers; others' CPU s: the rest "
            "of the machine during the same interval, a disturbed repeat shows here):",
            "",
            *repeat_rows(timings),
            "",
            "Serial split, each stage alone on the main thread for all the run's images:",
            "",
            *split_rows(setup, split, forward),
            "",
            *diagnosis(setup, timings, split, ratio),
            "",
        ]
    )


def write_report(path: Path, section: str, append: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if append and path.exists():
        with open(path, "a") as f:
            f.write("\n" + section)
        return
    title = (
        "# Cache throughput against a bare forward pass\n\n"
        "Written by `bench/cache_throughput.py` (its docstring says what (a), (a2), (a3) and (b) "
        "are). Requirement: (b)/(a) ≤ 1.10.\n\n"
    )
    path.write_text(title + section)


# ---------------------------------------------------------------------------------- main
def build_setup(args: argparse.Namespace, workdir: Path) -> Setup:
    shards_dir = workdir / "shards"
    shutil.rmtree(shards_dir, ignore_errors=True)
    start = time.perf_counter()
    write_photo_shards(shards_dir, args.images, args.shard_size)
    shards = sorted(shards_dir.glob("*.tar"))
    elapsed = time.perf_counter() - start
    log(f"wrote {args.images} images in {len(shards)} shard(s) in {elapsed:.1f}s")
    device = resolve_device(args.device)
    pretrained = resolve_pretrained(args.model, args.pretrained)
    start = time.perf_counter()
    tower = load_vision_tower(args.model, pretrained, device, args.model_dtype)
    log(f"loaded {args.model} ({tower.pretrained}) in {time.perf_counter() - start:.1f}s")
    layers = (
        [int(x) for x in args.layers.split(",")] if args.layers else default_layers(tower.n_blocks)
    )
    if not all(0 <= layer < tower.n_blocks for layer in layers):
        raise SystemExit(f"--layers {args.layers}: {args.model} has blocks 0..{tower.n_blocks - 1}")
    config = CacheConfig(
        shards=str(shards_dir),
        out=str(workdir / "cache"),
        layers=tuple(layers),
        model=args.model,
        pretrained=pretrained,
        device=device,
        model_dtype=args.model_dtype,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        write_threads=args.write_threads,
        storage=args.storage,
        codec=args.codec,
        chunk_images=args.chunk_images,
        rows_per_shard=rows_per_shard(args.shard_size, args.chunk_images),
    )
    full, rest = divmod(args.images, args.shard_size)
    shard_sizes = [args.shard_size] * full + ([rest] if rest else [])
    return Setup(tower, shards, sorted(set(layers)), config, workdir, shard_sizes)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cache_throughput_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        setup = build_setup(args, workdir)
        timings, split = measure(setup, args.repeats, args.quiet_wait)
        section = report(args, setup, timings, split)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    write_report(args.out, section, args.append)
    print(section)
    log(f"results in {args.out}")


if __name__ == "__main__":
    main()
