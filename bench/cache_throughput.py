"""Stage one's cost against a bare forward pass of the same model on the same images, as a ratio.

Why: the cache must cost at most 10% over running the model alone. This script measures both in one
process, on the same images, alternating them, and writes a markdown report:

  (a)  bare forward: the cache's own DataLoader (`ShardImages` + `shard_loader`, same batch size and
       workers) feeding `residual_stream(tower, images, layers)`, writing nothing;
  (a2) `tower.visual(images)`, the whole tower, on images decoded beforehand into memory;
  (a3) `residual_stream` on the same in-memory images: (a) without its data loading;
  (b)  `vitscope.pipeline.run.cache(CacheConfig(...))` into a fresh cache directory.

The tower is loaded once. (b) gets that same tower through a patched `run.load_vision_tower` (no
pipeline code changes), so neither (a) nor (b) includes model loading; (b) does include creating
the cache, its DataLoader, the writes, row tables and commits. Two more views say where (b)'s extra
time goes: a serial split (decode, encode, compress + write, each alone on the main thread) and one
profiled run each of (a) and (b), their main thread's time by activity.

Shared machines are noisy, so every timing also records the CPU seconds the rest of the machine
used meanwhile. With --quiet-wait (the default on a CPU) each timing first waits for a quiet
machine, and a repeat whose (a) or (b) saw others use more than 5% of a core is marked disturbed,
kept in the table, left out of the medians and made up by another repeat (up to --max-repeats).
On a GPU node (no wait by default) others' CPU is only reported: it includes kernel threads such as
the writeback of (b)'s own files.

The images are img2dataset-shaped webdataset shards made from scikit-image's photos
(`bench/photo_shards.py`). Without downloaded weights the model has seeded random weights: the same
arithmetic, so the same speed.

Run (CPU defaults: ViT-B-32, its CLIP-Scope layers 2,5,8,11, 128 images):

    .venv/bin/python bench/cache_throughput.py
    .venv/bin/python bench/cache_throughput.py --model ViT-L-14 --images 32 --batch-size 8 \\
        --shard-size 16 --repeats 2 --append

On a GPU node (ViT-L-14's eight CLIP-Scope layers, bfloat16 by default on CUDA):

    .venv/bin/python bench/cache_throughput.py --model ViT-L-14 --images 1024 --batch-size 64 \\
        --num-workers 8 --shard-size 256 --out bench/results/cache_throughput_gpu.md
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
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numcodecs
import torch
import zarr
from photo_shards import write_photo_shards

from vitscope.cache_spec import storage as storage_module
from vitscope.cache_spec import store as store_module
from vitscope.cache_spec.layout import CLIP_SCOPE_LAYERS
from vitscope.cache_spec.storage import ENCODINGS
from vitscope.demo import DEMO_PRETRAINED, demo_weights
from vitscope.pipeline import run as run_module
from vitscope.pipeline import writer as writer_module
from vitscope.pipeline.config import CacheConfig
from vitscope.pipeline.dataset import ShardImages, shard_loader
from vitscope.pipeline.model import (
    VisionTower,
    import_open_clip,
    load_vision_tower,
    residual_stream,
)
from vitscope.pipeline.run import cache, cache_attrs
from vitscope.support.devices import resolve_device

LIMIT = 1.10
"""The requirement: the cache may take at most 10% longer than the bare forward pass."""

DISTURBED_CORES = 0.05
"""A timing is disturbed when other processes used more than this share of a core meanwhile."""

DEFAULT_OUT = Path(__file__).parent / "results" / "cache_throughput.md"


# ---------------------------------------------------------------------------------- records
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
    None where /proc/stat is missing."""

    @property
    def disturbed(self) -> bool:
        return self.other is not None and self.other > DISTURBED_CORES * self.wall

    def __str__(self) -> str:
        return f"{self.wall:.2f}s (CPU {self.cpu:.1f}s, others' CPU {fmt_other(self)}s)"


@dataclass(frozen=True)
class Repeat:
    """One round: (a) and (b) back to back, then (a2) and (a3)."""

    bare: Measurement
    cache: Measurement
    full_in_memory: Measurement
    stream_in_memory: Measurement
    cache_reported: float
    """The run summary's own seconds."""
    disk_bytes: int
    """Bytes (b) left on disk in its layer arrays."""

    @property
    def clean(self) -> bool:
        return not (self.bare.disturbed or self.cache.disturbed)


@dataclass(frozen=True)
class Split:
    """Each stage alone on the main thread, for all the run's images."""

    decode: Measurement
    encode: Measurement
    write: Measurement
    """Compress and write chunks already encoded (`Cache.write_encoded`)."""


@dataclass
class Results:
    repeats: list[Repeat]
    split: Split
    profiles: dict[str, Profile]
    judged: bool
    """Whether disturbed repeats were left out (only when waiting for a quiet machine)."""

    @property
    def disk_bytes(self) -> int:
        return self.repeats[-1].disk_bytes

    @property
    def used(self) -> list[Repeat]:
        """The undisturbed repeats, or all of them when not judged or none was undisturbed."""
        if not self.judged:
            return self.repeats
        return [r for r in self.repeats if r.clean] or self.repeats

    def median(self, field: str) -> float:
        return statistics.median(getattr(r, field).wall for r in self.used)

    @property
    def ratio(self) -> float:
        return self.median("cache") / self.median("bare")


class Profile:
    """Wall seconds inside chosen functions, summed by name, for one profiled run.

    Calls on the main thread count only when not nested in another profiled call (a shard's commit
    encodes and submits its tail chunk), so they add up to the run's wall time with "other" as the
    rest; calls on other threads (the chunk writers) are summed over those threads.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.main: dict[str, float] = defaultdict(float)
        self.workers: dict[str, float] = defaultdict(float)
        self.measurement = Measurement(0.0, 0.0, None)
        self._lock = threading.Lock()
        self._depth = threading.local()

    def wrap(self, name: str, fn: Callable, sync_device: bool = False) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            on_main = threading.current_thread() is threading.main_thread()
            depth = getattr(self._depth, "n", 0)
            self._depth.n = depth + 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if sync_device:
                    sync(self.device)
                self._depth.n = depth
                elapsed = time.perf_counter() - start
                with self._lock:
                    if not on_main:
                        self.workers[name] += elapsed
                    elif depth == 0:
                        self.main[name] += elapsed

        return wrapper

    def iterate(self, name: str, iterable: Iterable) -> Iterator:
        """Yield from iterable, counting the time each item takes to arrive."""
        start = time.perf_counter()
        iterator = iter(iterable)
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.main[name] += time.perf_counter() - start
            yield item
            start = time.perf_counter()


# ---------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = CacheConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", default="ViT-B-32", help="open_clip model name")
    add(
        "--pretrained",
        default="auto",
        help="open_clip tag, weights file, 'none' (seeded random weights), or 'auto': the demo's "
        "tag when its weights are in the local hub cache, else 'none'",
    )
    add("--layers", help="comma-separated blocks; default: the CLIP-Scope layers the model has")
    add("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    add("--model-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    add("--images", type=int, default=128, help="distinct images to encode")
    add("--batch-size", type=int, default=32)
    add("--num-workers", type=int, default=defaults.num_workers)
    add("--write-threads", type=int, default=defaults.write_threads)
    add("--shard-size", type=int, default=64, help="samples per input shard")
    add("--chunk-images", type=int, default=defaults.chunk_images)
    add("--storage", default=defaults.storage)
    add("--codec", default=defaults.codec)
    add("--repeats", type=int, default=3, help="undisturbed (a)/(b) repeats wanted")
    add("--max-repeats", type=int, help="give up after this many repeats (default 2 x --repeats)")
    add(
        "--quiet-wait",
        type=float,
        help="seconds to wait, before each timing, for other processes to quiet down (0: never; "
        "default 60 on the CPU, 0 on a GPU)",
    )
    add("--out", type=Path, default=DEFAULT_OUT, help="markdown results file")
    add("--append", action="store_true", help="add this run's section to --out, not replace it")
    add("--workdir", type=Path, help="shards and caches go here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    if min(args.images, args.batch_size, args.shard_size, args.repeats) < 1:
        parser.error("--images, --batch-size, --shard-size and --repeats must be at least 1")
    args.max_repeats = max(args.max_repeats or 2 * args.repeats, args.repeats)
    if args.quiet_wait is None:
        args.quiet_wait = 60.0 if resolve_device(args.device) == "cpu" else 0.0
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
def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


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


def fmt_other(m: Measurement) -> str:
    return "?" if m.other is None else f"{m.other:.1f}"


def wait_for_quiet(max_wait: float) -> None:
    """On a shared machine, wait (up to max_wait s) until others use a few % of a core at most."""
    deadline = time.perf_counter() + max_wait
    while max_wait > 0:
        probe = timed(lambda: time.sleep(1.0), torch.device("cpu"))
        if not probe.disturbed:
            return
        if time.perf_counter() > deadline:
            log(f"machine still busy (others use {fmt_other(probe)} cores); measuring anyway")
            return


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
def patched(owner: object, name: str, value: object) -> Iterator[None]:
    """Replace owner.name for the duration of the block."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def preloaded_tower(tower: VisionTower) -> Callable[..., VisionTower]:
    """A stand-in for `load_vision_tower` that returns the tower already in memory."""

    def reuse(model: str, pretrained: str, device: str = "cpu", *args: object) -> VisionTower:
        if model != tower.model or torch.device(device) != tower.device:
            raise RuntimeError(f"cache() asked for {model} on {device}, not the preloaded tower")
        return tower

    return reuse


# ---------------------------------------------------------------------------------- measurements
def bare_forward(setup: Setup, profile: Profile | None = None) -> Measurement:
    """(a): the cache's DataLoader and forward pass, activations dropped."""
    tower, config = setup.tower, setup.config
    dataset = ShardImages(
        list(enumerate(setup.shards)), tower.preprocess, config.batch_size, tower.image_size
    )
    loader = shard_loader(dataset, config.num_workers, pin_memory=tower.device.type == "cuda")
    batches: Iterable = loader
    forward = residual_stream
    if profile:
        batches = profile.iterate("wait for the DataLoader (incl. worker start)", loader)
        forward = profile.wrap("forward (residual_stream)", residual_stream, True)

    def run() -> None:
        n_images = 0
        for batch in batches:
            if batch.n_images:
                forward(tower, batch.images_BCHW, setup.layers)
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


PROFILED = [
    (run_module, "residual_stream", "forward (residual_stream)", True),
    (run_module, "create_or_open", "create the cache", False),
    (storage_module.Encoding, "encode", "Encoding.encode: check, cast, to host", False),
    (storage_module.Encoding, "encode_on_device", "Encoding.encode_on_device: peak, cast", False),
    (writer_module, "_to_host", "copy to the host (writer._to_host)", False),
    (storage_module.Encoding, "check_peak", "Encoding.check_peak", False),
    (run_module.WriteQueue, "submit", "blocked on the full write queue", False),
    (run_module.ShardWriter, "commit", "shard commit: wait for its chunks, row table", False),
    (store_module.Cache, "write_encoded", "compress + write (Cache.write_encoded)", False),
    (store_module.Cache, "write_chunk", "encode + compress + write (Cache.write_chunk)", False),
]
"""What a profiled (b) times: (owner, attribute, label, synchronize the GPU after the call).
The pipeline moves work between its main thread and its writer threads as it is tuned, so every
name is timed on whichever thread calls it, and names this version of the pipeline lacks are
skipped."""


def profiling_patches(stack: ExitStack, profile: Profile) -> None:
    """Wrap what `cache()` calls, by the names it calls them through; nothing is edited."""
    wait_name = "wait for the DataLoader (incl. worker start)"
    loader = run_module.shard_loader
    stack.enter_context(
        patched(
            run_module, "shard_loader", lambda *a, **k: profile.iterate(wait_name, loader(*a, **k))
        )
    )
    for owner, name, label, sync_device in PROFILED:
        if hasattr(owner, name):
            wrapped = profile.wrap(label, getattr(owner, name), sync_device)
            stack.enter_context(patched(owner, name, wrapped))


def cache_run(
    setup: Setup, name: str, profile: Profile | None = None
) -> tuple[Measurement, float, int]:
    """(b): a whole `cache()` into a fresh directory; (timing, cache()'s own s, bytes on disk)."""
    out = setup.workdir / name
    shutil.rmtree(out, ignore_errors=True)
    config = dataclasses.replace(setup.config, out=str(out))
    result: list[run_module.CacheRunSummary] = []
    with ExitStack() as stack:
        stack.enter_context(patched(run_module, "load_vision_tower", preloaded_tower(setup.tower)))
        if profile:
            profiling_patches(stack, profile)
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
    """Encode, then compress + write, every chunk of the run alone on the main thread.

    The chunks are written into a scratch cache at the run's own chunk indices: the work of (b)'s
    writer threads, without the forward pass beside it.
    """
    tower, config = setup.tower, setup.config
    chunks = split_chunks(setup, batches[0])
    n_per_layer = setup.n_chunks // len(setup.layers)
    encoding = ENCODINGS[config.storage]
    scratch = setup.workdir / "split_cache"
    shutil.rmtree(scratch, ignore_errors=True)
    attrs = cache_attrs(config, tower, [p.name for p in setup.shards])
    store = store_module.create_or_open(scratch, attrs)

    def encode_all() -> None:
        for _ in range(n_per_layer):
            for chunk in chunks.values():
                encoding.encode(chunk)

    encoded = {layer: encoding.encode(chunk) for layer, chunk in chunks.items()}

    def write_all() -> None:
        for index in range(n_per_layer):
            for layer, (stored, scale_D) in encoded.items():
                store.write_encoded(layer, index, stored, scale_D)

    for layer, (stored, scale_D) in encoded.items():  # warm-up: first calls into codecs, zarr
        store.write_encoded(layer, 0, stored, scale_D)
    encode = timed(encode_all, tower.device)
    write = timed(write_all, tower.device)
    shutil.rmtree(scratch, ignore_errors=True)
    return Split(decode, encode, write)


def one_repeat(setup: Setup, index: int, batches: list[torch.Tensor], quiet: float) -> Repeat:
    """(a) and (b) in ABBA order (even repeats a first), then (a2) and (a3)."""
    found: dict[str, Measurement] = {}
    reported, disk = 0.0, 0
    for which in ("a", "b") if index % 2 == 0 else ("b", "a"):
        wait_for_quiet(quiet)
        if which == "a":
            found["a"] = bare_forward(setup)
        else:
            found["b"], reported, disk = cache_run(setup, f"cache_{index}")
        log(f"repeat {index}: ({which}) {found[which]}")
    wait_for_quiet(quiet)
    found["a2"] = full_forward(setup.tower, batches)
    found["a3"] = stream_forward(setup.tower, batches, setup.layers)
    log(f"repeat {index}: (a2) {found['a2']}, (a3) {found['a3']}")
    return Repeat(found["a"], found["b"], found["a2"], found["a3"], reported, disk)


def profiled_run(setup: Setup, which: str, quiet: float) -> Profile:
    """One more (a) or (b), its time split by activity; redone (twice at most) if disturbed."""
    for _ in range(3 if quiet > 0 else 1):
        profile = Profile(setup.tower.device)
        wait_for_quiet(quiet)
        if which == "a":
            profile.measurement = bare_forward(setup, profile)
        else:
            profile.measurement = cache_run(setup, "cache_profiled", profile)[0]
        log(f"profiled ({which}) {profile.measurement}")
        if not profile.measurement.disturbed:
            break
    return profile


def measure(setup: Setup, args: argparse.Namespace) -> Results:
    tower, quiet = setup.tower, args.quiet_wait
    batches: list[torch.Tensor] = []
    wait_for_quiet(quiet)
    decode = timed(lambda: batches.extend(decode_in_memory(setup)), torch.device("cpu"))
    log(f"decoded {setup.n_images} images in-process in {decode}")
    with torch.inference_mode():  # warm-up: one batch through both forward paths
        tower.visual(batches[0].to(device=tower.device, dtype=tower.dtype))
    stream_forward(tower, batches[:1], setup.layers)
    wait_for_quiet(quiet)
    split = serial_split(setup, batches, decode)
    log(f"split: encode {split.encode}, compress + write {split.write}")
    judged = quiet > 0  # on a dedicated machine, (b)'s own page-cache writeback counts as "others"
    results = Results([], split, {}, judged)
    while len(results.repeats) < args.max_repeats and (
        len([r for r in results.repeats if r.clean or not judged]) < args.repeats
    ):
        results.repeats.append(one_repeat(setup, len(results.repeats), batches, quiet))
        if judged and not results.repeats[-1].clean:
            log(f"repeat {len(results.repeats) - 1} was disturbed by other processes")
    results.profiles = {which: profiled_run(setup, which, quiet) for which in ("a", "b")}
    return results


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
        return datetime.now(timezone.utc).strftime("%a %b %d %H:%M:%S UTC %Y")


def command_line() -> str:
    venv_python = Path(".venv/bin/python")
    ours = venv_python.exists() and venv_python.absolute() == Path(sys.executable)
    return shlex.join([str(venv_python) if ours else "python", *sys.argv])


def git(*args: str) -> str:
    root = Path(__file__).resolve().parent.parent
    command = ["git", "-C", str(root), *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def source_version() -> str:
    """The checkout measured: HEAD, the last commit to stage one's code, and local changes."""
    try:
        head = git("log", "-1", "--format=%h")
        stage_one = git("log", "-1", "--format=%h %s", "--", "pipeline", "cache_spec")
        dirty = git("status", "--porcelain", "--", "pipeline", "cache_spec")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git checkout)"
    local = ", with local changes" if dirty else ""
    return f"HEAD {head}; stage one (pipeline/, cache_spec/) last changed in {stage_one}{local}"


def settings_lines(args: argparse.Namespace, setup: Setup) -> list[str]:
    tower, config = setup.tower, setup.config
    workers = min(config.num_workers, len(setup.shards))
    return [
        f"- Date: {utc_date()}",
        f"- vitscope: {args.source}",
        *machine_lines(tower.device),
        f"- Weights: {tower.pretrained}; T={tower.n_tokens}, D={tower.d_model}, "
        f"{tower.n_blocks} blocks",
        f"- {setup.n_images} distinct images (scikit-image photos, cropped/flipped, 224 px JPEG) "
        f"in {len(setup.shards)} shard(s) of up to {args.shard_size}; batch {config.batch_size}, "
        f"{workers} DataLoader worker(s) (--num-workers {config.num_workers}, at most one per "
        f"shard), {config.write_threads} write threads, chunks of {config.chunk_images} images, "
        f"storage {config.storage}, codec {config.codec}",
        f"- (a) and (b) alternate (ABBA), each after waiting up to {args.quiet_wait:.0f}s for a "
        "quiet machine. Model loading is excluded everywhere: (b) runs the real `cache()` with "
        "the already loaded tower patched in for `load_vision_tower`.",
    ]


def rate_row(name: str, seconds: float, setup: Setup, base: float, disk: int) -> str:
    raw = setup.raw_bytes / seconds / 1e6
    on_disk = f"{disk / seconds / 1e6:.1f}" if disk else "–"
    return (
        f"| {name} | {seconds:.2f} | {setup.n_images / seconds:.1f} | {raw:.1f} | {on_disk} "
        f"| {seconds / base:.3f} |"
    )


def rate_rows(setup: Setup, results: Results) -> list[str]:
    bare = results.median("bare")
    return [
        "| measurement | median s | images/s | activations MB/s (raw) | on disk MB/s | vs (a) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        rate_row("(a) bare forward, cache's DataLoader", bare, setup, bare, 0),
        rate_row(
            "(a2) `tower.visual`, in-memory", results.median("full_in_memory"), setup, bare, 0
        ),
        rate_row(
            "(a3) `residual_stream`, in-memory",
            results.median("stream_in_memory"),
            setup,
            bare,
            0,
        ),
        rate_row("(b) `cache()`", results.median("cache"), setup, bare, results.disk_bytes),
    ]


def repeat_rows(results: Results) -> list[str]:
    rows = [
        "| repeat | (a) s | (b) s | (b)/(a) | (a) CPU s | (b) CPU s | others' CPU s in (a), (b) "
        "| used | (a2) s | (a3) s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for i, r in enumerate(results.repeats):
        a, b = r.bare, r.cache
        used = "yes" if r.clean or not results.judged else "disturbed"
        used = used if r in results.used else "no, disturbed"
        rows.append(
            f"| {i} | {a.wall:.2f} | {b.wall:.2f} | {b.wall / a.wall:.3f} | {a.cpu:.1f} "
            f"| {b.cpu:.1f} | {fmt_other(a)}, {fmt_other(b)} | {used} "
            f"| {r.full_in_memory.wall:.2f} | {r.stream_in_memory.wall:.2f} |"
        )
    return rows


def split_rows(setup: Setup, split: Split, forward: float) -> list[str]:
    storage = setup.config.storage
    stages = [
        ("decode + preprocess (in-process, no workers)", split.decode.wall, split.decode),
        (f"forward to layer {max(setup.layers)} ((a3), median)", forward, None),
        (f"encode: range check, cast to {storage}, to host", split.encode.wall, split.encode),
        (f"compress + write {setup.n_chunks} chunks (zarr)", split.write.wall, split.write),
    ]
    rows = [
        "| stage | seconds | vs forward (a3) | others' CPU s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, seconds, m in stages:
        rows.append(
            f"| {name} | {seconds:.2f} | {seconds / forward:.1%} | {fmt_other(m) if m else '–'} |"
        )
    return rows


def profile_rows(profiles: dict[str, Profile]) -> list[str]:
    a, b = profiles["a"], profiles["b"]
    names = list(dict.fromkeys([*a.main, *b.main]))
    rows = ["| main thread | (a) s | (b) s |", "| --- | ---: | ---: |"]
    for name in names:
        rows.append(f"| {name} | {a.main.get(name, 0.0):.2f} | {b.main.get(name, 0.0):.2f} |")
    wall_a, wall_b = a.measurement.wall, b.measurement.wall
    rest_a, rest_b = wall_a - sum(a.main.values()), wall_b - sum(b.main.values())
    rows.append(f"| other (loop, progress bar, chunk slicing) | {rest_a:.2f} | {rest_b:.2f} |")
    rows.append(f"| **wall** | **{wall_a:.2f}** | **{wall_b:.2f}** |")
    rows.append(
        f"| others' CPU s meanwhile | {fmt_other(a.measurement)} | {fmt_other(b.measurement)} |"
    )
    for name, seconds in b.workers.items():
        rows.append(f"| writer threads, summed: {name} | – | {seconds:.2f} |")
    return rows


def diagnosis(setup: Setup, results: Results) -> list[str]:
    """Where (b)'s extra time goes: the rates the cache needs and gets, and the profiles."""
    bare, cached, ratio = results.median("bare"), results.median("cache"), results.ratio
    split, used = results.split, results.used
    a, b = results.profiles["a"], results.profiles["b"]
    stalls = {k: v - a.main.get(k, 0.0) for k, v in b.main.items()}
    worst = max(stalls, key=lambda k: stalls[k])
    extra_cpu = statistics.median(r.cache.cpu for r in used) - statistics.median(
        r.bare.cpu for r in used
    )
    raw_mb = setup.raw_bytes / 1e6
    need = raw_mb / bare
    write_rate = raw_mb / max(split.write.wall, 1e-9)
    encode_share = split.encode.wall / bare
    threads, cores = setup.config.write_threads, os.cpu_count()
    lines = [
        f"The cache took {cached - bare:+.2f}s ({ratio:.3f}×) against the bare forward pass: "
        f"{'within' if ratio <= LIMIT else 'over'} the {LIMIT:.2f}× limit. Keeping pace with (a) "
        f"means storing {need:.1f} MB/s of raw activations; alone on one thread, compressing and "
        f"writing runs at {write_rate:.1f} MB/s, so it needs {need / write_rate:.2f} thread(s) of "
        f"CPU ({threads} write threads, {cores} cores), and encoding (check, cast, copy to the "
        f"host) takes {split.encode.wall:.2f}s, {encode_share:.1%} of (a). Beside the forward "
        f"pass (b) used {extra_cpu:+.1f} CPU seconds over (a), and its main thread spent the most "
        f'extra time, {stalls[worst]:+.2f}s, in "{worst}".',
    ]
    if ratio <= LIMIT:
        return lines
    if setup.tower.device.type == "cpu":
        lines.append(
            "On a CPU the forward pass already uses every core, so each CPU second of encoding, "
            "compression and writing is taken from it; a cheaper --codec or fewer --write-threads "
            "than cores would cut that."
        )
    else:
        lines.append(
            "On the GPU the forward pass leaves the host to keep up: "
            + (
                f"the writes need more CPU than {threads} threads give (more --write-threads, "
                "a cheaper --codec, or 8-bit --storage, which halves the bytes)"
                if need / write_rate > threads
                else "the write threads have the CPU they need, so the main thread's own work "
                "(the row above) is what holds the forward pass back"
            )
            + "."
        )
    return lines


def repeats_line(results: Results) -> str:
    n_run = len(results.repeats)
    if not results.judged:
        return (
            f"- Repeats: {n_run}, all used (no --quiet-wait: others' CPU is reported, not judged; "
            "it includes kernel threads such as the writeback of (b)'s files)."
        )
    n_clean = sum(r.clean for r in results.repeats)
    return (
        f"- Repeats: {n_run} run, {n_clean} undisturbed (others used < {DISTURBED_CORES:.0%} of a "
        f"core); medians are over {'those' if n_clean else 'all of them, none being undisturbed'}."
    )


def report(args: argparse.Namespace, setup: Setup, results: Results) -> str:
    tower = setup.tower
    used = results.used
    pairs = ", ".join(f"{r.cache.wall / r.bare.wall:.3f}" for r in used)
    cpu_ratio = statistics.median(r.cache.cpu for r in used) / statistics.median(
        r.bare.cpu for r in used
    )
    forward = results.median("stream_in_memory")
    return "\n".join(
        [
            f"## {tower.model}, layers {','.join(map(str, setup.layers))}, {tower.device.type}, "
            f"{str(tower.dtype).removeprefix('torch.')}",
            "",
            "```",
            command_line(),
            "```",
            "",
            *settings_lines(args, setup),
            repeats_line(results),
            "",
            f"**Ratio (b)/(a) = {results.ratio:.3f}** (limit {LIMIT:.2f}: "
            f"{'PASS' if results.ratio <= LIMIT else 'FAIL'}); per repeat used: {pairs}; "
            f"CPU seconds (b)/(a): {cpu_ratio:.3f}.",
            "",
            *rate_rows(setup, results),
            "",
            f"Raw activations: {setup.raw_bytes / 1e6:.1f} MB ({setup.n_images} images × "
            f"{len(setup.layers)} layers × {tower.n_tokens} × {tower.d_model} × "
            f"{ENCODINGS[setup.config.storage].bytes_per_value} B); on disk "
            f"{results.disk_bytes / 1e6:.1f} MB "
            f"({results.disk_bytes / setup.raw_bytes:.1%}). `cache()`'s own summary.seconds, "
            f"median: {statistics.median(r.cache_reported for r in used):.2f}s.",
            "",
            "Every repeat (CPU s: this process and its DataLoader workers; others' CPU s: the "
            "rest of the machine meanwhile):",
            "",
            *repeat_rows(results),
            "",
            "Serial split, each stage alone on the main thread for all the run's images:",
            "",
            *split_rows(setup, results.split, forward),
            "",
            "One profiled run of (a) and of (b), not in the ratio (redone up to twice if "
            "disturbed, with --quiet-wait; on a GPU the forward is synchronized per batch):",
            "",
            *profile_rows(results.profiles),
            "",
            *diagnosis(setup, results),
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
        f"are). Requirement: (b)/(a) ≤ {LIMIT:.2f}.\n\n"
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
    args.source = source_version()  # at the start: the code this run imported
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cache_throughput_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        setup = build_setup(args, workdir)
        section = report(args, setup, measure(setup, args))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    write_report(args.out, section, args.append)
    print(section)
    log(f"results in {args.out}")


if __name__ == "__main__":
    main()
