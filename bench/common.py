"""What the benchmarks share: one timing harness and the caches they measure.

Harness: `timed` (wall seconds, own CPU seconds and the rest of the machine's meanwhile),
`wait_for_quiet`, `alternate` (named measurements in ABBA order, disturbed rounds marked and made
up), `Profile` (a run's time by function, on patched names), `md_table` and `publish` (a results
section with date, machine and exact command).
Caches: `write_random_cache` and `write_single_shard_cache` (the real writer, no model),
`layer_bytes`, `sequential_read` and `take_tokens` (the training loader's batches).
"""

from __future__ import annotations

import itertools
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from unittest import mock

import pyarrow as pa
import torch

from vitscope.cache_spec import Cache, CacheAttrs, ShardCommit, create_or_open
from vitscope.cache_spec.codecs import DEFAULT_CODEC
from vitscope.cache_spec.layout import ROWS_SCHEMA
from vitscope.train.loader import Batch

DISTURBED_CORES = 0.05
"""A timing is disturbed when other processes used more than this share of a core meanwhile."""


# ------------------------------------------------------------------------------------ harness
@dataclass(frozen=True)
class Timing:
    """One timed call: shared machines are noisy, so others' CPU meanwhile goes with its wall."""

    wall: float
    cpu: float
    """CPU seconds of this process and its finished children (e.g. DataLoader workers)."""
    others: float | None
    """CPU seconds the rest of the machine used meanwhile (steal included); None without
    /proc/stat."""
    result: Any = None
    """What the timed call returned."""

    @property
    def disturbed(self) -> bool:
        return self.others is not None and self.others > DISTURBED_CORES * self.wall

    @property
    def others_cell(self) -> str:
        return "?" if self.others is None else f"{self.others:.1f}"

    def __str__(self) -> str:
        return f"{self.wall:.2f}s (CPU {self.cpu:.1f}s, others' CPU {self.others_cell}s)"


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def sync(device: torch.device | None) -> None:
    """Wait for the GPU's queued work, so that a clock stopped next counts it."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _machine_busy_seconds() -> float | None:
    """CPU seconds all cores have spent busy since boot (first line of /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields)
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """This process's CPU seconds and its waited-for children's, as /proc/self/stat counts them."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(fn: Callable[[], Any], device: torch.device | None = None) -> Timing:
    """Time fn(), the GPU's queued work finished before the clock starts and before it stops."""
    sync(device)
    busy, own = _machine_busy_seconds(), _own_cpu_seconds()
    start = time.perf_counter()
    result = fn()
    sync(device)
    wall = time.perf_counter() - start
    cpu = _own_cpu_seconds() - own
    after = _machine_busy_seconds()
    others = None if busy is None or after is None else max(after - busy - cpu, 0.0)
    return Timing(wall, cpu, others, result)


def wait_for_quiet(max_wait: float) -> None:
    """Wait (up to max_wait s, 0: not at all) until others use a few % of a core at most."""
    deadline = time.perf_counter() + max_wait
    while max_wait > 0:
        probe = timed(lambda: time.sleep(1.0))
        if not probe.disturbed:
            return
        if time.perf_counter() > deadline:
            log(f"machine still busy (others used {probe.others_cell}s in 1s); measuring anyway")
            return


@dataclass
class Rounds:
    """What `alternate` measured: every name's timings, one per round, and which rounds count."""

    timings: dict[str, list[Timing]]
    disturbed: list[bool]
    """Per round: some timing in it saw others use more than DISTURBED_CORES of a core."""
    judged: bool
    """Whether disturbed rounds are left out (only after waiting for a quiet machine: on a
    dedicated node others' CPU includes kernel threads writing back our own files)."""

    def counts(self, index: int) -> bool:
        return not (self.judged and self.disturbed[index])

    def used_rounds(self) -> list[int]:
        """The rounds that count, or all of them where none does."""
        every = range(len(self.disturbed))
        return [i for i in every if self.counts(i)] or list(every)

    def used(self, name: str) -> list[Timing]:
        return [self.timings[name][i] for i in self.used_rounds()]

    def median(self, name: str) -> float:
        return statistics.median(t.wall for t in self.used(name))


def alternate(
    runs: dict[str, Callable[[], Timing]],
    repeats: int,
    max_repeats: int | None = None,
    quiet_wait: float = 0.0,
) -> Rounds:
    """Rounds of every measurement, in order then reversed (A B, B A, ...), so that drift and
    noisy spells hit all alike, until `repeats` rounds count (at most `max_repeats` rounds).

    Each callable times itself (with `timed`, around just what it measures); with a quiet wait
    each call first waits for a quiet machine.
    """
    rounds = Rounds({name: [] for name in runs}, [], judged=quiet_wait > 0)
    order = list(runs)
    while len(rounds.disturbed) < max(max_repeats or repeats, repeats) and (
        sum(map(rounds.counts, range(len(rounds.disturbed)))) < repeats
    ):
        index = len(rounds.disturbed)
        for name in order if index % 2 == 0 else order[::-1]:
            wait_for_quiet(quiet_wait)
            rounds.timings[name].append(runs[name]())
            log(f"round {index}: {name} {rounds.timings[name][-1]}")
        rounds.disturbed.append(any(rounds.timings[name][-1].disturbed for name in runs))
    return rounds


class Profile:
    """Wall seconds inside chosen functions of one run, summed by label: where its time goes.

    Main-thread calls count only when not nested in another profiled call, so they add up to the
    run's wall time with the rest unaccounted; calls on other threads (e.g. writers) are summed
    over those threads.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.main: dict[str, float] = defaultdict(float)
        self.workers: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()
        self._depth = threading.local()

    def wrap(self, label: str, fn: Callable, sync_device: bool = False) -> Callable:
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
                        self.workers[label] += elapsed
                    elif depth == 0:
                        self.main[label] += elapsed

        return wrapper

    def iterate(self, label: str, iterable: Iterable) -> Iterator:
        """Yield from iterable, counting the time each item (and the first, iter()) takes."""
        step = self.wrap(label, next)
        iterator = self.wrap(label, iter)(iterable)
        while True:
            try:
                item = step(iterator)
            except StopIteration:
                return
            yield item

    def patch(self, stack: ExitStack, targets: Iterable[tuple[object, str, str, bool]]) -> None:
        """Wrap each (owner, attribute, label, sync the GPU after) while `stack` is open; what
        the owner lacks is skipped, so that one list serves code that moves work around."""
        for owner, name, label, sync_device in targets:
            if hasattr(owner, name):
                wrapped = self.wrap(label, getattr(owner, name), sync_device)
                stack.enter_context(mock.patch.object(owner, name, wrapped))


def md_table(header: str, rows: Iterable[str]) -> list[str]:
    """A markdown table's lines from cells joined by " | ", ready for a `publish` body."""
    columns = header.count(" | ") + 1
    return [f"| {header} |", "|" + " --- |" * columns, *(f"| {row} |" for row in rows)]


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in cpu.splitlines()
            if line.startswith("Model name")
        ),
        platform.processor(),
    )
    return f"{model}, {torch.get_num_threads()} threads"


def command_line() -> str:
    """How this benchmark was run, from the project root, for its results section."""
    return shlex.join(["python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def publish(
    out: Path, device: torch.device, command: str, body: list[str], append: bool = True
) -> None:
    """Print a results section (date, machine, exact command, body) and add it to `out` (or
    replace `out` with it)."""
    lines = [
        f"### {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine(device)}",
        "",
        f"`{command}` (torch {torch.__version__})",
        "",
        *body,
        "",
    ]
    print("\n".join(lines))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a" if append else "w") as f:
        f.write("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------- caches
def write_random_cache(
    path: Path, n_images: int, chunk_images: int, layer: int = 20, codec: str = DEFAULT_CODEC
) -> Path:
    """float16 activations of ViT-L/14's shape (T=257, D=1024) through the real writer, one shard:
    loader and training speed do not depend on the values."""
    generator = torch.Generator().manual_seed(0)
    chunks = (
        torch.randn(chunk_images, 257, 1024, generator=generator)
        for _ in range(n_images // chunk_images)
    )
    return write_single_shard_cache(path, chunks, n_images, chunk_images, layer, "float16", codec)


def single_shard_attrs(
    n_images: int,
    chunk_images: int,
    n_tokens: int,
    d_model: int,
    layers: tuple[int, ...],
    storage: str,
    codec: str,
) -> CacheAttrs:
    """A cache of one input shard of `n_images` rows, made by no model."""
    return CacheAttrs(
        model="bench",
        pretrained="none:seed=0",
        image_size=224,
        n_tokens=n_tokens,
        d_model=d_model,
        n_blocks=max(layers) + 1,
        layers=layers,
        storage=storage,  # type: ignore[arg-type]
        codec=codec,
        chunk_images=chunk_images,
        rows_per_shard=-(-n_images // chunk_images) * chunk_images,
        shards=("00000.tar",),
        model_dtype="float32",
        preprocess="",
    )


def padded(chunk_CTD: torch.Tensor, chunk_images: int) -> torch.Tensor:
    """A shard's tail chunk filled up with zero rows to C, as the pipeline writes it."""
    padding = chunk_CTD.new_zeros(chunk_images - len(chunk_CTD), *chunk_CTD.shape[1:])
    return torch.cat([chunk_CTD, padding])


def commit_rows(store: Cache, n_images: int) -> None:
    """Commit the one shard's `n_images` rows, so that readers see them."""
    rows = pa.table(
        {
            "row": list(range(n_images)),
            "shard": ["00000.tar"] * n_images,
            "key": [str(i) for i in range(n_images)],
            "url": [None] * n_images,
            "caption": [None] * n_images,
            "status": ["ok"] * n_images,
            "error": [None] * n_images,
        },
        schema=ROWS_SCHEMA,
    )
    store.commit(ShardCommit("00000.tar", 0, 0, n_images, 0, 0, "bench", "now"), rows)


def write_single_shard_cache(
    path: Path,
    chunks_CTD: Iterable[torch.Tensor],
    n_images: int,
    chunk_images: int,
    layer: int,
    storage: str,
    codec: str = DEFAULT_CODEC,
) -> Path:
    """Whole chunks of given activations through the real cache writer as one committed shard
    of `n_images` rows (no model, no images: benchmarks of what comes after stage one)."""
    chunks = iter(chunks_CTD)
    first = next(chunks)
    _, n_tokens, d_model = first.shape
    attrs = single_shard_attrs(n_images, chunk_images, n_tokens, d_model, (layer,), storage, codec)
    store = create_or_open(path, attrs)
    for index, chunk in enumerate(itertools.chain([first], chunks)):
        store.write_chunk(layer, index, padded(chunk, chunk_images))
    commit_rows(store, n_images)
    return path


def layer_bytes(path: Path) -> int:
    """Bytes on disk of a cache's layer arrays (layer_LL, and layer_LL_scale for 8 bits)."""
    folders = [d for d in path.iterdir() if d.is_dir() and d.name.startswith("layer_")]
    return sum(f.stat().st_size for d in folders for f in d.rglob("*") if f.is_file())


def sequential_read(folder: Path) -> int:
    """Read every chunk file once, in name order, into memory; returns the bytes read."""
    return sum(len(f.read_bytes()) for f in sorted(folder.rglob("*")) if f.is_file())


def take_tokens(batches: Iterator[Batch], n_tokens: int) -> int:
    """Draw batches until `n_tokens` tokens have come; returns how many did."""
    seen = 0
    for batch in batches:
        seen += len(batch.acts_BD)
        if seen >= n_tokens:
            break
    return seen
