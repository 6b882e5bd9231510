"""Decode and preprocess shards in DataLoader workers, one whole shard per worker at a time.

Each worker yields batches that never mix shards, and marks a shard's last batch, so the main
process can commit a shard the moment its last rows are written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vitscope.pipeline.shards import SampleRecord, ShardReadError, decode_sample, read_samples


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
    n_images: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_images = self.images_BCHW.shape[0]

    def pin_memory(self) -> ShardBatch:
        """Called by DataLoader(pin_memory=True): page-locked images copy to the GPU faster."""
        self.images_BCHW = self.images_BCHW.pin_memory()
        return self


class ShardImages(IterableDataset):
    """Batches of preprocessed images from the given (index, shard) pairs."""

    def __init__(
        self,
        shards: list[tuple[int, Path]],
        preprocess: Callable[[Image.Image], torch.Tensor],
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
        images: list[torch.Tensor] = []
        records: list[SampleRecord] = []
        try:
            for sample in read_samples(shard):
                decoded = decode_sample(sample, self.preprocess)
                records.append(decoded.record)
                if decoded.image_CHW is not None:
                    images.append(decoded.image_CHW)
                if len(images) == self.batch_size:
                    yield ShardBatch(index, shard, torch.stack(images), records)
                    images, records = [], []
        except ShardReadError as err:
            yield ShardBatch(index, shard, self._stack([]), [], last=True, error=str(err))
            return
        size = shard.stat().st_size
        yield ShardBatch(index, shard, self._stack(images), records, last=True, source_bytes=size)

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
    )
