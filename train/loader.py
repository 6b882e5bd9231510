"""Stream shuffled training tokens from a cache at the speed of the disk, resumable by one number.

The order of tokens is a pure function of (seed, epoch, chunk list): each epoch permutes the
training chunks, groups them into windows of `buffer_tokens` tokens, and permutes the tokens of
each window. Batches are consecutive slices of that stream, so the position of a run is the number
of tokens it has consumed, and resuming is a seek: load the window holding that position and skip
into it. Every training token is used exactly once per epoch.

Whole chunks are read and decoded by reader processes (train/readers.py) straight from their files
into a shared buffer, a window ahead of the trainer, so that reading overlaps training and needs
none of its GIL; one gather then lays a window's tokens out in their shuffled order, float16 as
stored (in page-locked memory for a GPU, which converts them). Held-out images are whole chunks
set aside by the same seed.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from vitscope.cache_spec.errors import CacheSpecError
from vitscope.cache_spec.store import Cache, ChunkRef
from vitscope.cache_spec.tokens import TokenSet
from vitscope.support.errors import BadSetting, MissingInput
from vitscope.train.readers import ChunkReaders, all_finite

BATCHES_AHEAD = 8
"""Batches gathered ahead of the trainer; reading runs a whole window ahead of that."""


@dataclass
class Batch:
    acts_BD: Tensor
    """Activations as cached (unscaled), float16 unless the cache stores float32: the trainer
    moves half the bytes to its device and converts there."""
    rows_B: Tensor
    """The cache row (image) each token came from."""
    position: int
    """Tokens of the stream consumed once this batch is used: save it to resume after it."""


@dataclass
class _Window:
    """Chunks whose tokens are shuffled together."""

    start: int
    """Stream position of the window's first token."""
    key: tuple[int, int]
    """(epoch, index in the epoch): seeds the window's permutation."""
    refs: list[ChunkRef]
    skip: int = 0
    """Tokens at its start already consumed (a resumed stream's first window)."""


class _BatchFiller:
    """Batches gathered token by token from the readers' buffer, a batch spanning two windows
    filled from both: each batch is fresh memory of its own, safe to keep, and batch-sized
    allocations are recycled by malloc where window-sized ones would fault in every page."""

    def __init__(self, batch_size: int, d_model: int, dtype: torch.dtype, position: int) -> None:
        self.batch_size, self.d_model, self.dtype = batch_size, d_model, dtype
        self.position = position
        self._acts: Tensor | None = None
        self._rows: Tensor | None = None
        self._filled = 0

    def fill(
        self, buffer_ND: Tensor, source_N: Tensor, rows_N: Tensor, pin_memory: bool
    ) -> Iterator[Batch]:
        """Gather the tokens at `source_N` of the buffer, yielding each batch once it is full."""
        taken = 0
        while taken < len(source_N):
            if self._acts is None:
                self._acts = torch.empty(
                    self.batch_size, self.d_model, dtype=self.dtype, pin_memory=pin_memory
                )
                self._rows = torch.empty(self.batch_size, dtype=torch.long)
            assert self._rows is not None
            n = min(self.batch_size - self._filled, len(source_N) - taken)
            into = slice(self._filled, self._filled + n)
            torch.index_select(buffer_ND, 0, source_N[taken : taken + n], out=self._acts[into])
            self._rows[into] = rows_N[taken : taken + n]
            taken += n
            self._filled += n
            if self._filled == self.batch_size:
                self.position += self.batch_size
                yield Batch(self._acts, self._rows, self.position)
                self._acts, self._rows, self._filled = None, None, 0


class ActivationStream:
    """Shuffled batches of one layer's tokens, and the held-out images, from a cache."""

    def __init__(
        self,
        cache: Cache,
        layer: int,
        tokens: TokenSet = "all",
        batch_size: int = 4096,
        buffer_tokens: int = 2**19,
        seed: int = 0,
        heldout_fraction: float = 0.01,
        readers: int = 4,
        pin_memory: bool = False,
        part: int = 0,
        parts: int = 1,
    ) -> None:
        self.cache, self.layer, self.tokens = cache, layer, tokens
        self.batch_size, self.seed, self.readers = batch_size, seed, readers
        self.pin_memory = pin_memory
        """Windows in page-locked memory, for batches that copy to a GPU while it computes."""
        chunks = cache.chunks()
        order = np.random.default_rng([seed, 2**31]).permutation(len(chunks))
        n_heldout = min(len(chunks) - 1, int(np.ceil(heldout_fraction * len(chunks))))
        self.heldout_chunks = sorted((chunks[i] for i in order[:n_heldout]), key=_row_order)
        train_chunks = sorted((chunks[i] for i in order[n_heldout:]), key=_row_order)
        self.train_chunks = train_chunks[part::parts]
        """This stream's chunks: with `parts` streams (data-parallel ranks), every part-th one,
        so the parts are disjoint and together hold every training chunk."""
        if parts > 1 and len(train_chunks) < parts:
            raise BadSetting(
                f"{cache.path}: {len(train_chunks)} training chunks cannot be shared by {parts} "
                "ranks; use fewer ranks or a larger cache"
            )
        self.token_slice = cache.attrs.token_layout.token_set(tokens)
        """The tokens of each image it streams (a one-line error for CLS on a model without)."""
        self.tokens_per_image = len(range(cache.attrs.n_tokens)[self.token_slice])
        full_chunk_tokens = cache.attrs.chunk_images * self.tokens_per_image
        self.chunks_per_window = max(1, -(-buffer_tokens // full_chunk_tokens))
        self.epoch_tokens = sum(c.n_rows for c in self.train_chunks) * self.tokens_per_image
        if self.epoch_tokens == 0:
            raise MissingInput(f"{cache.path}: no training tokens (is the cache empty?)")
        self.window_dtype = torch.float32 if cache.attrs.storage == "float32" else torch.float16

    # ------------------------------------------------------------------ the order
    def epoch_windows(self, epoch: int) -> list[list[ChunkRef]]:
        """The training chunks of one epoch in their seeded order, grouped into windows."""
        permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.train_chunks))
        ordered = [self.train_chunks[i] for i in permutation]
        size = self.chunks_per_window
        return [ordered[i : i + size] for i in range(0, len(ordered), size)]

    def batches(self, position: int = 0) -> Iterator[Batch]:
        """Batches from stream position `position` on, forever (epoch after epoch)."""
        ready: queue.Queue = queue.Queue(maxsize=BATCHES_AHEAD)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(position, ready, stop), daemon=True)
        producer.start()
        try:
            while True:
                batch = ready.get()
                if isinstance(batch, BaseException):
                    raise batch
                yield batch
        finally:
            stop.set()
            while producer.is_alive():
                try:
                    ready.get_nowait()
                except queue.Empty:
                    producer.join(timeout=0.05)

    def _produce(self, position: int, ready: queue.Queue, stop: threading.Event) -> None:
        """Gather batches in stream order from `position` on: the readers fill one half of their
        buffer with the next window's chunks while batches are gathered from the other half."""
        # One OpenMP thread for this thread's gathers (the setting is per thread): forking the
        # pool for each gather contended with the reader processes for the cores, and a single
        # thread gathers faster than a GPU consumes (BENCHMARKS.md, issue 12).
        torch.set_num_threads(1)
        try:
            slots, attrs = self.chunks_per_window, self.cache.attrs
            slot_numel = attrs.chunk_images * attrs.n_tokens * attrs.d_model
            batches = _BatchFiller(self.batch_size, attrs.d_model, self.window_dtype, position)
            with ChunkReaders(self.readers, 2 * slots, slot_numel, self.window_dtype) as readers:
                buffer_ND, pending = readers.buffer.view(-1, attrs.d_model), None
                for half, window in zip(
                    itertools.cycle((0, slots)), self._windows_from(position), strict=False
                ):
                    files = [self.cache.chunk_file(self.layer, ref) for ref in window.refs]
                    reads = readers.submit(half, files)
                    if pending is not None:
                        source, rows = self._window_tokens(*pending)
                        for batch in batches.fill(buffer_ND, source, rows, self.pin_memory):
                            if not _put(batch, ready, stop):
                                return
                    pending = (half, window, reads)
        except BaseException as err:  # handed to the consumer, which raises it
            ready.put(err)

    def _windows_from(self, position: int) -> Iterator[_Window]:
        """Every window from the one holding `position` on, forever."""
        epoch = position // self.epoch_tokens
        while True:
            start = epoch * self.epoch_tokens
            for index, refs in enumerate(self.epoch_windows(epoch)):
                size = sum(ref.n_rows for ref in refs) * self.tokens_per_image
                if start + size > position:
                    yield _Window(start, (epoch, index), refs, skip=max(0, position - start))
                start += size
            epoch += 1

    def _window_tokens(
        self, first_slot: int, window: _Window, reads: list[Future[list[bool]]]
    ) -> tuple[Tensor, Tensor]:
        """Where the window's tokens lie in the readers' buffer, in their shuffled order from its
        first unconsumed token, and their rows: the window is the concatenation of its chunks'
        chosen tokens, permuted by the seed."""
        finite = [ok for read in reads for ok in read.result()]
        for ref, ok in zip(window.refs, finite, strict=True):
            if not ok:
                raise non_finite_error(self.cache, self.layer, ref)
        n_tokens = self.cache.attrs.n_tokens
        chosen = np.arange(n_tokens)[self.token_slice]
        slot_tokens = self.cache.attrs.chunk_images * n_tokens
        source = np.concatenate(
            [
                (
                    slot_tokens * (first_slot + i)
                    + n_tokens * np.arange(ref.n_rows)[:, None]
                    + chosen
                ).ravel()
                for i, ref in enumerate(window.refs)
            ]
        )
        rows = np.concatenate(
            [
                np.arange(ref.first_row, ref.first_row + ref.n_rows).repeat(len(chosen))
                for ref in window.refs
            ]
        )
        permutation = np.random.default_rng([self.seed, *window.key, 2**30]).permutation(
            len(source)
        )
        kept = permutation[window.skip :]
        return torch.from_numpy(source[kept]), torch.from_numpy(rows[kept])

    # ---------------------------------------------------------------- held out
    def heldout_images(self, max_images: int) -> tuple[Tensor, Tensor]:
        """Up to `max_images` held-out images with all their tokens: (N, T, D) and their rows."""
        acts, rows = [], []
        for ref, chunk_NTD in read_chunks(self.cache, self.layer, self.heldout_chunks, 1):
            acts.append(chunk_NTD)
            rows.append(torch.arange(ref.first_row, ref.first_row + ref.n_rows))
            if sum(len(a) for a in acts) >= max_images:
                break
        if not acts:
            raise BadSetting(f"{self.cache.path}: no held-out chunks; raise heldout_fraction")
        return torch.cat(acts)[:max_images], torch.cat(rows)[:max_images]


def read_finite_chunk(
    cache: Cache, layer: int, ref: ChunkRef, dtype: torch.dtype = torch.float32
) -> Tensor:
    """One whole chunk (n_rows, T, D); NaN or inf activations are a one-line error naming rows."""
    chunk_NTD = cache.read_chunk(layer, ref, dtype)
    if not all_finite(chunk_NTD):
        raise non_finite_error(cache, layer, ref)
    return chunk_NTD


def non_finite_error(cache: Cache, layer: int, ref: ChunkRef) -> CacheSpecError:
    """A chunk written with NaN or inf behind the writer's back: names its layer, rows, shard."""
    rows = f"{ref.first_row}..{ref.first_row + ref.n_rows - 1}"
    return CacheSpecError(
        cache.path,
        f"finite activations in layer {layer}, rows {rows}",
        "NaN or inf",
        fix=f"re-cache shard {cache.attrs.shards[ref.shard_index]} or write a new cache",
    )


def read_chunks(
    cache: Cache, layer: int, refs: list[ChunkRef], threads: int = 4
) -> Iterator[tuple[ChunkRef, Tensor]]:
    """Whole chunks in the given order, float32, read and decoded ahead by `threads` threads
    (2 x threads chunks in flight): for passes that need whole images in order."""
    with ThreadPoolExecutor(threads) as pool:
        pending = deque(
            (ref, pool.submit(read_finite_chunk, cache, layer, ref)) for ref in refs[: 2 * threads]
        )
        upcoming = iter(refs[2 * threads :])
        while pending:
            ref, future = pending.popleft()
            following = next(upcoming, None)
            if following is not None:
                pending.append((following, pool.submit(read_finite_chunk, cache, layer, following)))
            yield ref, future.result()


def _put(batch: Batch, ready: queue.Queue, stop: threading.Event) -> bool:
    """Hand a batch to the consumer unless it stopped; False once it has."""
    while not stop.is_set():
        try:
            ready.put(batch, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _row_order(ref: ChunkRef) -> int:
    return ref.first_row


def distinct_images(batch: Batch) -> int:
    """How many different images the tokens of a batch come from (a measure of the shuffle)."""
    return int(batch.rows_B.unique().numel())


def tensor_batches(acts_ND: Tensor, batch_size: int, seed: int = 0) -> Iterator[Batch]:
    """Batches from activations already in memory, reshuffled every epoch: for tests, benchmarks
    and small experiments. Row ids are token indices."""
    position = 0
    for epoch in itertools.count():
        order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(len(acts_ND)))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            position += batch_size
            rows = order[start : start + batch_size]
            yield Batch(acts_ND[rows], rows, position)
