"""Stage one's main loop: shards -> DataLoader workers -> one forward pass per batch -> chunks.

`cache(config)` creates or resumes a cache: committed shards are skipped, every other shard of this
writer's part is encoded from its first image, so a killed run re-run ends with each row once.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from vitscope.cache_spec.layout import CacheAttrs
from vitscope.cache_spec.storage import ENCODINGS
from vitscope.cache_spec.store import (
    Cache,
    ShardCommit,
    check_cache_destination,
    create_or_open,
)
from vitscope.pipeline.config import CacheConfig
from vitscope.pipeline.dataset import ShardBatch, ShardImages, shard_loader
from vitscope.pipeline.device_decode import DeviceDecoder
from vitscope.pipeline.model import VisionTower, load_vision_tower, residual_stream
from vitscope.pipeline.shards import expected_images, list_shards
from vitscope.pipeline.writer import CommitQueue, ShardTooLargeError, ShardWriter, WriteQueue
from vitscope.support.devices import resolve_device
from vitscope.support.errors import BadSetting
from vitscope.support.launch import launch_from_environment
from vitscope.support.progress import status


@dataclass
class CacheRunSummary:
    """What one `vitscope cache` run did; `failed` names shards that stay uncommitted, and why."""

    cache: Path | str
    already_committed: int = 0
    committed: int = 0
    rows: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    failed: dict[str, str] = field(default_factory=dict)
    empty: list[str] = field(default_factory=list)
    seconds: float = 0.0
    bytes_stored: int = 0

    def lines(self) -> list[str]:
        rate = self.rows / self.seconds if self.seconds else 0.0
        out = [
            f"{self.cache}: committed {self.committed} shard(s) with {self.rows} rows in "
            f"{self.seconds:.1f}s ({rate:.1f} images/s, "
            f"{self.bytes_stored / max(self.seconds, 1e-9) / 1e6:.1f} MB/s before compression); "
            f"{self.already_committed} were already committed",
        ]
        out += [f"skipped {n} image(s): {reason}" for reason, n in self.skipped.most_common()]
        out += [f"empty shard (committed with 0 rows): {shard}" for shard in self.empty]
        out += [f"FAILED {shard}: {error}" for shard, error in self.failed.items()]
        return out


def cache_attrs(config: CacheConfig, tower: VisionTower, shards: list[str]) -> CacheAttrs:
    """What the cache will record: the run's settings plus what the model itself says, and
    where its images were decoded, so a resume cannot mix the two decode paths in one cache."""
    preprocess = " | ".join(repr(t) for t in tower.preprocess.transforms)
    return CacheAttrs(
        model=tower.model,
        pretrained=tower.pretrained,
        image_size=tower.image_size,
        n_tokens=tower.n_tokens,
        prefix_tokens=tower.layout.prefix,
        patch_grid=tower.layout.grid,
        d_model=tower.d_model,
        n_blocks=tower.n_blocks,
        layers=tuple(sorted(set(config.layers))),
        storage=config.storage,
        codec=config.codec,
        chunk_images=config.chunk_images,
        rows_per_shard=config.rows_per_shard,
        shards=tuple(shards),
        model_dtype=str(tower.dtype).removeprefix("torch."),
        preprocess=preprocess if config.decode == "pil" else f"{preprocess} (--decode device)",
        source_shards=str(Path(config.shards).resolve()),
    )


def cache(config: CacheConfig) -> CacheRunSummary:
    """Encode every not-yet-committed shard of this writer's part into the cache."""
    started = time.perf_counter()
    config = part_from_launch(config)
    shard_paths = {path.name: path for path in list_shards(Path(config.shards))}
    check_cache_destination(config.out)
    device = resolve_device(config.device)
    status(f"loading {config.model} ({config.pretrained}) on {device}")
    tower = load_vision_tower(
        config.model, config.pretrained, device, config.model_dtype, config.seed
    )
    decoder = DeviceDecoder(tower) if config.decode == "device" else None
    store = create_or_open(config.out, cache_attrs(config, tower, sorted(shard_paths)))
    summary = CacheRunSummary(cache=store.path)
    todo = []
    committed = store.commits()
    for index, name in enumerate(store.attrs.shards):
        if index % config.parts != config.part or name not in shard_paths:
            continue
        if index in committed:
            summary.already_committed += 1
        else:
            todo.append((index, shard_paths[name]))
    if todo:
        _encode(store, tower, decoder, config, todo, summary)
    summary.seconds = time.perf_counter() - started
    return summary


def part_from_launch(config: CacheConfig) -> CacheConfig:
    """Under torchrun each rank is one writer: part = rank, parts = world size, so N processes
    (on any number of nodes) split the shards with no overlap and no gap, and need no flags."""
    launch = launch_from_environment()
    if not launch.distributed:
        return config
    if config.parts != 1:
        raise BadSetting(
            f"--parts {config.parts} under torchrun ({launch.world} ranks): torchrun's ranks are "
            "the parts; drop --part/--parts, or run without torchrun"
        )
    return dataclasses.replace(config, part=launch.rank, parts=launch.world)


def _encode(
    store: Cache,
    tower: VisionTower,
    decoder: DeviceDecoder | None,
    config: CacheConfig,
    todo: list,
    summary: CacheRunSummary,
) -> None:
    attrs = store.attrs
    preprocess = tower.preprocess if decoder is None else None
    dataset = ShardImages(todo, preprocess, config.batch_size, tower.image_size)
    loader = shard_loader(dataset, config.num_workers, pin_memory=tower.device.type == "cuda")
    bytes_per_row = (
        len(attrs.layers)
        * attrs.n_tokens
        * attrs.d_model
        * ENCODINGS[attrs.storage].bytes_per_value
    )
    expected = [expected_images(path) for _, path in todo]
    total = None if None in expected else sum(expected)  # type: ignore[arg-type]
    queue = WriteQueue(config.write_threads, max_pending=4 * config.write_threads)
    commits = CommitQueue()
    writers: dict[int, ShardWriter] = {}
    failed: set[int] = set()
    layers = list(attrs.layers)
    desc = "cache" if config.parts == 1 else f"cache part {config.part}/{config.parts}"
    progress = tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True, smoothing=0.1)
    try:
        for batch in loader:
            if batch.shard_index in failed:
                continue
            writer = writers.setdefault(
                batch.shard_index, ShardWriter(store, batch.shard_index, queue, batch.shard)
            )
            if decoder is not None:
                batch = decoder(batch)
            try:
                _write_batch(tower, layers, writer, batch)
            except ShardTooLargeError as err:
                _fail(store, summary, failed, writers, batch, str(err))
                continue
            if batch.error is not None:
                _fail(store, summary, failed, writers, batch, batch.error)
                continue
            if batch.last:
                writers.pop(batch.shard_index)
                _count(summary, commits.submit(writer, batch.source_bytes))
            summary.bytes_stored += batch.n_images * bytes_per_row
            progress.update(batch.n_images)
            elapsed = progress.format_dict["elapsed"] or 1e-9
            progress.set_postfix_str(f"{summary.bytes_stored / elapsed / 1e6:.0f} MB/s")
        _count(summary, commits.finished())
    finally:
        progress.close()
        commits.close()
        queue.close()


def _count(summary: CacheRunSummary, done: list[tuple[ShardWriter, ShardCommit]]) -> None:
    for writer, commit in done:
        summary.committed += 1
        summary.rows += commit.n_rows
        summary.skipped.update(r.error.split(":")[0] for _, r in writer.records if r.error)
        if not writer.records:
            summary.empty.append(commit.shard)


def _write_batch(
    tower: VisionTower, layers: list[int], writer: ShardWriter, batch: ShardBatch
) -> None:
    acts = residual_stream(tower, batch.images_BCHW, layers) if batch.n_images else {}
    writer.add(acts, batch.records)


def _fail(
    store: Cache,
    summary: CacheRunSummary,
    failed: set[int],
    writers: dict[int, ShardWriter],
    batch: ShardBatch,
    error: str,
) -> None:
    """A shard that cannot be cached is left uncommitted and noted; the run goes on."""
    failed.add(batch.shard_index)
    writers.pop(batch.shard_index, None)
    store.record_error(batch.shard.name, error)
    summary.failed[batch.shard.name] = error
