"""Read shards in DataLoader workers, one whole shard per worker at a time, and decode and
preprocess their images there (`--decode pil`) or hand the bytes on (`--decode device`).

Each worker yields batches that never mix shards, and marks a shard's last batch, so the main
process can commit a shard the moment its last rows are written.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vitscope.pipeline.shards import (
    SampleRecord,
    ShardReadError,
    decode_with_pil,
    model_input,
    read_samples,
    sample_record,
)
from vitscope.support.lifetime import die_with_parent


@dataclass
class ShardBatch:
    """Consecutive samples of one shard: the usable images and every sample's record."""

    shard_index: int
    shard: Path
    images_BCHW: torch.Tensor
    records: list[SampleRecord]
    """All samples of this stretch of the shard, skipped ones included, in tar order."""
    last: bool = False
    error: str | None = None
    """Set when the tar itself failed: the shard must not be committed."""
    source_bytes: int = 0
    encoded: list[bytes] = field(default_factory=list)
    """Undecoded image bytes (`--decode device`), one per record without an error, in order."""
    n_images: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_images = self.images_BCHW.shape[0]

    def pin_memory(self) -> ShardBatch:
        """Called by DataLoader(pin_memory=True): page-locked images copy to the GPU faster."""
        self.images_BCHW = self.images_BCHW.pin_memory()
        return self


class ShardImages(IterableDataset):
    """Batches of preprocessed images from the given (index, shard) pairs; with no `preprocess`,
    batches of the images' bytes for the main process to decode on the device."""

    def __init__(
        self,
        shards: list[tuple[int, Path]],
        preprocess: Callable[[Image.Image], torch.Tensor] | None,
        batch_size: int,
        image_size: int,
    ) -> None:
        self.shards = shards
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.image_size = image_size

    def __iter__(self) -> Iterator[ShardBatch]:
        worker = get_worker_info()
        mine = self.shards if worker is None else self.shards[worker.id :: worker.num_workers]
        for index, shard in mine:
            yield from self._shard_batches(index, shard)

    def _shard_batches(self, index: int, shard: Path) -> Iterator[ShardBatch]:
        images: list[torch.Tensor | bytes] = []
        records: list[SampleRecord] = []
        try:
            for sample in read_samples(shard):
                record, image = self._image(sample)
                records.append(record)
                if image is not None:
                    images.append(image)
                if len(images) == self.batch_size:
                    yield self._batch(index, shard, images, records)
                    images, records = [], []
        except ShardReadError as err:
            yield self._batch(index, shard, [], [], last=True, error=str(err))
            return
        size = shard.stat().st_size
        yield self._batch(index, shard, images, records, last=True, source_bytes=size)

    def _image(self, sample: dict[str, bytes]) -> tuple[SampleRecord, torch.Tensor | bytes | None]:
        record, data = sample_record(sample)
        if data is None or self.preprocess is None:
            return record, data
        return record, decode_with_pil(
            record, data, partial(model_input, preprocess=self.preprocess)
        )

    def _batch(
        self,
        index: int,
        shard: Path,
        images: list,
        records: list[SampleRecord],
        last: bool = False,
        error: str | None = None,
        source_bytes: int = 0,
    ) -> ShardBatch:
        """Stack the preprocessed images, or pass the bytes on as they are (`--decode device`)."""
        if self.preprocess is None:
            images_BCHW, encoded = self._stack([]), images
        else:
            images_BCHW, encoded = self._stack(images), []
        return ShardBatch(index, shard, images_BCHW, records, last, error, source_bytes, encoded)

    def _stack(self, images: list[torch.Tensor]) -> torch.Tensor:
        if images:
            return torch.stack(images)
        return torch.empty(0, 3, self.image_size, self.image_size)


def _keep(batch: ShardBatch) -> ShardBatch:
    return batch


def shard_loader(dataset: ShardImages, num_workers: int, pin_memory: bool) -> DataLoader:
    """Batches are made by the dataset itself, so the loader only moves them out of workers."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=min(num_workers, len(dataset.shards)),
        collate_fn=_keep,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
        worker_init_fn=partial(_start_worker, os.getpid()),
    )


def _start_worker(parent_pid: int, worker_id: int) -> None:
    """A worker blocked reading a shard (a stalled mount, a pipe) misses torch's own check that
    its parent lives, so it is killed with it."""
    die_with_parent(parent_pid)
