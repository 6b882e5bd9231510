"""Stage one's cost against a bare forward pass of the same model on the same images, as a ratio.

The cache may cost at most 10% over running the model alone. In one process, on the same images,
in ABBA rounds (`common.alternate`: a, b, a2, a3, then a3, a2, b, a):

  (a)  bare forward: the cache's own DataLoader (`ShardImages` + `shard_loader`, same batch size and
       workers) feeding `residual_stream(tower, images, layers)`, writing nothing;
  (a2) `tower.visual(images)`, the whole tower, on images decoded beforehand into memory;
  (a3) `residual_stream` on the same in-memory images: (a) without its data loading;
  (b)  `vitscope.pipeline.run.cache(CacheConfig(...))` into a fresh cache directory, with the tower
       loaded once (a patched `run.load_vision_tower`): cache creation, DataLoader, writes, row
       tables and commits included, model loading not.

Where (b)'s extra time goes: a serial split (decode, encode, compress + write, each alone on the
main thread) and one profiled (a) and (b), their main thread's time by activity. With --quiet-wait
(the default on a CPU) each timing waits for a quiet machine and rounds in which others used more
than 5% of a core are made up (up to --max-repeats); on a GPU node others' CPU is only reported.
Images: img2dataset-shaped shards of scikit-image's photos (`bench/photo_shards.py`); without
downloaded weights the model has seeded random weights: the same arithmetic, so the same speed.

    .venv/bin/python bench/cache_throughput.py          # CPU: ViT-B-32, layers 2,5,8,11, 128 images
    .venv/bin/python bench/cache_throughput.py --model timm:vit_small_patch14_reg4_dinov2

`--model` takes any family `vitscope cache` takes (README "Backbones"): open_clip names, SigLIP,
PE-Core and EVA02 among them, and timm:NAME.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import statistics
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numcodecs
import torch
import zarr
from common import (
    Profile,
    Rounds,
    Timing,
    alternate,
    command_line,
    layer_bytes,
    log,
    md_table,
    publish,
    timed,
    wait_for_quiet,
)
from photo_shards import write_photo_shards

from vitscope.cache_spec import storage as storage_module
from vitscope.cache_spec import store as store_module
from vitscope.cache_spec.layout import CLIP_SCOPE_LAYERS
from vitscope.cache_spec.storage import ENCODINGS
from vitscope.demo import DEMO_PRETRAINED, demo_weights
from vitscope.pipeline import run as run_module
from vitscope.pipeline import writer as writer_module
from vitscope.pipeline.backbones.parts import import_timm
from vitscope.pipeline.config import CacheConfig
from vitscope.pipeline.dataset import ShardImages, shard_loader
from vitscope.pipeline.model import (
    VisionTower,
    import_open_clip,
    load_vision_tower,
    residual_stream,
)
from vitscope.support.devices import resolve_device

LIMIT = 1.10
"""The requirement: the cache may take at most 10% longer than the bare forward pass."""
SHARED_SETTINGS = ("model", "pretrained", "batch_size", "num_workers", "write_threads", "codec")
"""Flags that are `CacheConfig` fields of the same name."""
WAIT_LABEL = "wait for the DataLoader (incl. worker start)"
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
"""What a profiled run times: (owner, attribute, label, synchronize the GPU after the call). The
pipeline moves work between its main thread and its writer threads as it is tuned, so each name
is timed on whichever thread calls it, and names this version of the pipeline lacks are skipped."""


@dataclass(frozen=True)
class Setup:
    """What every measurement needs: the tower, loaded once, and the run's settings."""

    tower: VisionTower
    config: CacheConfig
    n_images: int
    shard_size: int

    @property
    def layers(self) -> list[int]:
        return list(self.config.layers)

    @property
    def shards(self) -> list[Path]:
        return sorted(Path(self.config.shards).glob("*.tar"))

    @property
    def chunks_per_layer(self) -> int:
        """Chunk files the run writes in each layer: each shard's images in whole chunks."""
        full, tail = divmod(self.n_images, self.shard_size)
        c = self.config.chunk_images
        return full * math.ceil(self.shard_size / c) + math.ceil(tail / c)

    def scratch(self, name: str) -> Path:
        """A fresh folder beside the shards."""
        path = Path(self.config.shards).parent / name
        shutil.rmtree(path, ignore_errors=True)
        return path


# ---------------------------------------------------------------------------------- measurements
def shard_images(setup: Setup) -> ShardImages:
    """The cache's own dataset over the run's shards: decoded and preprocessed with PIL."""
    tower = setup.tower
    shards = list(enumerate(setup.shards))
    return ShardImages(shards, tower.preprocess, setup.config.batch_size, tower.image_size)


def bare_forward(setup: Setup, profile: Profile | None = None) -> Timing:
    """(a): the cache's DataLoader and forward pass, activations dropped."""
    tower, config = setup.tower, setup.config
    dataset = shard_images(setup)
    loader = shard_loader(dataset, config.num_workers, pin_memory=tower.device.type == "cuda")
    batches: Iterable = profile.iterate(WAIT_LABEL, loader) if profile else loader
    forward = (
        profile.wrap("forward (residual_stream)", residual_stream, True)
        if profile
        else residual_stream
    )

    def run() -> Profile | None:
        n_images = 0
        for batch in batches:
            if batch.n_images:
                forward(tower, batch.images_BCHW, setup.layers)
                n_images += batch.n_images
        assert n_images == setup.n_images, (n_images, setup.n_images)
        return profile

    return timed(run, tower.device)


def in_memory(setup: Setup, whole_tower: bool, batches: list[torch.Tensor]) -> Timing:
    """(a2) the whole tower (every block, ln_post, projection), or (a3) `residual_stream`, on
    images decoded beforehand."""
    tower = setup.tower

    def run() -> None:
        with torch.inference_mode(whole_tower):
            for images in batches:
                if whole_tower:
                    tower.visual(images.to(tower.device, tower.dtype, non_blocking=True))
                else:
                    residual_stream(tower, images, setup.layers)

    return timed(run, tower.device)


def cache_run(setup: Setup, name: str, profile: Profile | None = None) -> Timing:
    """(b): a whole `cache()` into a fresh directory; its result is (cache()'s own seconds, bytes
    on disk), or the profile."""
    out = setup.scratch(name)
    config = dataclasses.replace(setup.config, out=str(out))
    tower = setup.tower
    with ExitStack() as stack:  # the tower already loaded, for the one `config` builds
        stack.enter_context(mock.patch.object(run_module, "load_vision_tower", lambda *_: tower))
        if profile:
            loader = run_module.shard_loader

            def waited(*args: Any, **kwargs: Any) -> Iterator:
                return profile.iterate(WAIT_LABEL, loader(*args, **kwargs))

            stack.enter_context(mock.patch.object(run_module, "shard_loader", waited))
            profile.patch(stack, PROFILED)
        timing = timed(lambda: run_module.cache(config), tower.device)
    summary = timing.result
    if summary.failed or summary.rows != setup.n_images:
        raise RuntimeError(f"cache run went wrong: {summary.lines()}")
    result = profile or (summary.seconds, layer_bytes(out))
    shutil.rmtree(out, ignore_errors=True)
    return dataclasses.replace(timing, result=result)


def serial_split(setup: Setup, batch_BCHW: torch.Tensor) -> tuple[Timing, Timing]:
    """Encode, then compress + write, every chunk of the run alone on the main thread: the work
    of (b)'s writer threads without the forward pass beside it, into a scratch cache."""
    tower, config = setup.tower, setup.config
    per_chunk = config.chunk_images
    chunks = {  # one chunk per layer of real activations (the batch repeated if smaller than C)
        layer: rows.repeat(math.ceil(per_chunk / len(rows)), 1, 1)[:per_chunk]
        for layer, rows in residual_stream(tower, batch_BCHW, setup.layers).items()
    }
    encoding = ENCODINGS[config.storage]
    scratch = setup.scratch("split_cache")
    attrs = run_module.cache_attrs(config, tower, [p.name for p in setup.shards])
    store = store_module.create_or_open(scratch, attrs)
    encoded = {layer: encoding.encode(chunk) for layer, chunk in chunks.items()}
    for layer, (stored, scale_D) in encoded.items():  # warm-up: first calls into codecs, zarr
        store.write_encoded(layer, 0, stored, scale_D)

    def encode_all() -> None:
        for _ in range(setup.chunks_per_layer):
            for chunk in chunks.values():
                encoding.encode(chunk)

    def write_all() -> None:
        for index in range(setup.chunks_per_layer):
            for layer, (stored, scale_D) in encoded.items():
                store.write_encoded(layer, index, stored, scale_D)

    encode, write = timed(encode_all, tower.device), timed(write_all, tower.device)
    shutil.rmtree(scratch, ignore_errors=True)
    return encode, write


# ---------------------------------------------------------------------------------- report
def report(setup: Setup, decode: Timing, split: tuple[Timing, Timing], rounds: Rounds) -> list[str]:
    """The section's settings line, the ratio, and the rate, round and split tables."""
    tower, config, used = setup.tower, setup.config, rounds.used_rounds()
    per_value = ENCODINGS[config.storage].bytes_per_value
    raw = setup.n_images * len(setup.layers) * tower.n_tokens * tower.d_model * per_value
    a, b = rounds.timings["a"], rounds.timings["b"]
    bare, cached, forward = rounds.median("a"), rounds.median("b"), rounds.median("a3")
    reported, disk = rounds.used("b")[-1].result
    cpu = statistics.median(b[i].cpu for i in used) / statistics.median(a[i].cpu for i in used)

    def rate(label: str, seconds: float, on_disk: int = 0) -> str:
        disk_cell = f"{on_disk / seconds / 1e6:.1f}" if on_disk else "–"
        return (
            f"{label} | {seconds:.2f} | {setup.n_images / seconds:.1f} | "
            f"{raw / seconds / 1e6:.1f} | {disk_cell} | {seconds / bare:.3f}"
        )

    def stage(label: str, t: Timing) -> str:
        return f"{label} | {t.wall:.2f} | {t.wall / forward:.1%} | {t.others_cell}"

    a2, a3 = rounds.timings["a2"], rounds.timings["a3"]
    return [
        f"{tower.model} ({tower.pretrained}; T={tower.n_tokens} = "
        f"{'+'.join(tower.layout.prefix) or 'no prefix'} + {tower.layout.grid[0]}x"
        f"{tower.layout.grid[1]} patches, D={tower.d_model}), layers "
        f"{','.join(map(str, setup.layers))}, {tower.device.type}, "
        f"{str(tower.dtype).removeprefix('torch.')}; {setup.n_images} images in "
        f"{len(setup.shards)} shard(s) of up to {setup.shard_size}; batch {config.batch_size}, "
        f"{min(config.num_workers, len(setup.shards))} DataLoader worker(s), "
        f"{config.write_threads} write threads, chunks of {config.chunk_images}, storage "
        f"{config.storage}, codec {config.codec}; {os.cpu_count()} cores; open_clip "
        f"{import_open_clip().__version__}, timm {import_timm().__version__}, zarr "
        f"{zarr.__version__}, numcodecs "
        f"{numcodecs.__version__}. Rounds: {len(a)} run, {len(used)} used"
        + ("." if rounds.judged else " (no --quiet-wait: others' CPU reported, not judged)."),
        "",
        f"**Ratio (b)/(a) = {cached / bare:.3f}** (limit {LIMIT:.2f}: "
        f"{'PASS' if cached / bare <= LIMIT else 'FAIL'}); per round used: "
        f"{', '.join(f'{b[i].wall / a[i].wall:.3f}' for i in used)}; CPU seconds (b)/(a): "
        f"{cpu:.3f}. Raw activations {raw / 1e6:.1f} MB, on disk {disk / 1e6:.1f} MB "
        f"({disk / raw:.1%}); `cache()`'s own summary.seconds {reported:.2f}s.",
        "",
        *md_table(
            "measurement | median s | images/s | activations MB/s (raw) | on disk MB/s | vs (a)",
            [
                rate("(a) bare forward, cache's DataLoader", bare),
                rate("(a2) `tower.visual`, in-memory", rounds.median("a2")),
                rate("(a3) `residual_stream`, in-memory", forward),
                rate("(b) `cache()`", cached, disk),
            ],
        ),
        "",
        *md_table(
            "repeat | (a) s | (b) s | (b)/(a) | (a) CPU s | (b) CPU s | others' CPU s in (a), (b) "
            "| used | (a2) s | (a3) s",
            (
                f"{i} | {a[i].wall:.2f} | {b[i].wall:.2f} | {b[i].wall / a[i].wall:.3f} | "
                f"{a[i].cpu:.1f} | {b[i].cpu:.1f} | {a[i].others_cell}, {b[i].others_cell} | "
                f"{'yes' if rounds.counts(i) else 'no, disturbed'} | {a2[i].wall:.2f} | "
                f"{a3[i].wall:.2f}"
                for i in range(len(a))
            ),
        ),
        "",
        *md_table(
            "stage | seconds | vs forward (a3) | others' CPU s",
            [
                stage("decode + preprocess (in-process, no workers)", decode),
                f"forward to layer {max(setup.layers)} ((a3), median) | {forward:.2f} | 100.0% | –",
                stage(f"encode: range check, cast to {config.storage}, to host", split[0]),
                stage(
                    f"compress + write {setup.chunks_per_layer * len(setup.layers)} chunks (zarr)",
                    split[1],
                ),
            ],
        ),
    ]


def profile_table(profiled: Rounds) -> list[str]:
    """Main-thread seconds by activity in one profiled (a) and (b), writer threads summed."""
    a, b = profiled.used("a")[-1], profiled.used("b")[-1]
    pa, pb = a.result, b.result
    rest_a, rest_b = a.wall - sum(pa.main.values()), b.wall - sum(pb.main.values())
    return md_table(
        "main thread | (a) s | (b) s",
        [
            *(
                f"{label} | {pa.main.get(label, 0.0):.2f} | {pb.main.get(label, 0.0):.2f}"
                for label in dict.fromkeys([*pa.main, *pb.main])
            ),
            f"other (loop, progress bar, chunk slicing) | {rest_a:.2f} | {rest_b:.2f}",
            f"**wall** | **{a.wall:.2f}** | **{b.wall:.2f}**",
            f"others' CPU s meanwhile | {a.others_cell} | {b.others_cell}",
            *(f"writer threads, summed: {k} | – | {s:.2f}" for k, s in pb.workers.items()),
        ],
    )


# ---------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    defaults = CacheConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", default="ViT-B-32", help="open_clip model name, or timm:NAME")
    add("--pretrained", default="auto", help="the library's tag, weights file, 'none', or 'auto'")
    add("--layers", help="comma-separated blocks; default: the CLIP-Scope layers the model has")
    add("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    add("--images", type=int, default=128, help="distinct images to encode")
    add("--batch-size", type=int, default=32)
    add("--num-workers", type=int, default=defaults.num_workers)
    add("--write-threads", type=int, default=defaults.write_threads)
    add("--shard-size", type=int, default=64, help="samples per input shard")
    add("--codec", default=defaults.codec)
    add("--repeats", type=int, default=3, help="undisturbed rounds wanted")
    add("--max-repeats", type=int, help="give up after this many rounds (default 2 x --repeats)")
    add("--quiet-wait", type=float, help="seconds to wait for a quiet machine before each timing")
    add("--out", type=Path, default=Path("bench/results/cache_throughput.md"))
    add("--append", action="store_true", help="add this run's section to --out, not replace it")
    add("--workdir", type=Path, help="shards and caches go here (default: a temp dir, removed)")
    args = parser.parse_args()
    if min(args.images, args.batch_size, args.shard_size, args.repeats) < 1:
        parser.error("--images, --batch-size, --shard-size and --repeats must be at least 1")
    args.max_repeats = max(args.max_repeats or 2 * args.repeats, args.repeats)
    if args.quiet_wait is None:  # a dedicated GPU node needs no wait
        args.quiet_wait = 60.0 if resolve_device(args.device) == "cpu" else 0.0
    if args.pretrained == "auto":  # the demo's weights where the local hub cache has them
        tag = DEMO_PRETRAINED.get(args.model)
        args.pretrained = demo_weights(args.model, tag) if tag else "none"
    return args


def build_setup(args: argparse.Namespace, workdir: Path) -> Setup:
    shards_dir = workdir / "shards"
    shutil.rmtree(shards_dir, ignore_errors=True)
    write_photo_shards(shards_dir, args.images, args.shard_size)
    device = resolve_device(args.device)
    tower = load_vision_tower(args.model, args.pretrained, device, CacheConfig.model_dtype)
    blocks, c = tower.n_blocks, CacheConfig.chunk_images
    default = [layer for layer in CLIP_SCOPE_LAYERS if layer < blocks] or [blocks - 1]
    layers = sorted({int(x) for x in args.layers.split(",")}) if args.layers else default
    if not all(0 <= layer < blocks for layer in layers):
        raise SystemExit(f"--layers {args.layers}: {args.model} has blocks 0..{blocks - 1}")
    config = CacheConfig(
        shards=str(shards_dir),
        layers=tuple(layers),
        device=device,
        rows_per_shard=math.ceil(args.shard_size / c) * c,
        **{name: getattr(args, name) for name in SHARED_SETTINGS},
    )
    return Setup(tower, config, args.images, args.shard_size)


def main() -> None:
    args = parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cache_throughput_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        setup = build_setup(args, workdir)
        tower, quiet = setup.tower, args.quiet_wait
        wait_for_quiet(quiet)
        decode = timed(lambda: [b.images_BCHW for b in shard_images(setup) if b.n_images])
        batches = decode.result
        log(f"decoded {setup.n_images} images in-process in {decode}")
        in_memory(setup, True, batches[:1])  # warm-up: one batch through both forward paths
        in_memory(setup, False, batches[:1])
        wait_for_quiet(quiet)
        split = serial_split(setup, batches[0])
        runs = {
            "a": lambda: bare_forward(setup),
            "b": lambda: cache_run(setup, "cache"),
            "a2": lambda: in_memory(setup, True, batches),
            "a3": lambda: in_memory(setup, False, batches),
        }
        rounds = alternate(runs, args.repeats, args.max_repeats, quiet)
        profiles = {
            "a": lambda: bare_forward(setup, Profile(tower.device)),
            "b": lambda: cache_run(setup, "cache_profiled", Profile(tower.device)),
        }
        profiled = alternate(profiles, 1, 3 if quiet > 0 else 1, quiet)  # redone if disturbed
        body = [*report(setup, decode, split, rounds), "", *profile_table(profiled)]
    finally:  # the report counts the shards, so it is written before they go
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    publish(args.out, tower.device, command_line(), body, append=args.append)


if __name__ == "__main__":
    main()
