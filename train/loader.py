"""Stream shuffled training tokens from a cache at the speed of the disk, resumable by one number.

The order of tokens is a pure function of (seed, epoch, chunk list): each epoch permutes the
training chunks, groups them into windows of `buffer_tokens` tokens, and permutes the tokens of
each window. Batches are consecutive slices of that stream, so the position of a run is the number
of tokens it has consumed, and resuming is a seek: load the window holding that position and skip
into it. Every training token is used exactly once per epoch.

Whole chunks are read and decoded by background threads, a window ahead of the trainer, so that
reading overlaps training. Held-out images are whole chunks set aside by the same seed.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from vitscope.cache_spec.store import Cache, ChunkRef

TokenChoice = Literal["all", "cls", "patches"]


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
    start: int
    """Stream position of the window's first token."""
    acts_ND: Tensor
    rows_N: Tensor


class ActivationStream:
    """Shuffled batches of one layer's tokens, and the held-out images, from a cache."""

    def __init__(
        self,
        cache: Cache,
        layer: int,
        tokens: TokenChoice = "all",
        batch_size: int = 4096,
        buffer_tokens: int = 2**19,
        seed: int = 0,
        heldout_fraction: float = 0.01,
        read_threads: int = 4,
    ) -> None:
        self.cache, self.layer, self.tokens = cache, layer, tokens
        self.batch_size, self.seed, self.read_threads = batch_size, seed, read_threads
        chunks = cache.chunks()
        order = np.random.default_rng([seed, 2**31]).permutation(len(chunks))
        n_heldout = min(len(chunks) - 1, int(np.ceil(heldout_fraction * len(chunks))))
        self.heldout_chunks = sorted((chunks[i] for i in order[:n_heldout]), key=_row_order)
        self.train_chunks = sorted((chunks[i] for i in order[n_heldout:]), key=_row_order)
        n_tokens = cache.attrs.n_tokens
        self.tokens_per_image = len(range(n_tokens)[token_slice(tokens, n_tokens)])
        full_chunk_tokens = cache.attrs.chunk_images * self.tokens_per_image
        self.chunks_per_window = max(1, -(-buffer_tokens // full_chunk_tokens))
        self.epoch_tokens = sum(c.n_rows for c in self.train_chunks) * self.tokens_per_image
        if self.epoch_tokens == 0:
            raise ValueError(f"{cache.path}: no training tokens (is the cache empty?)")
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
        windows: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        producer = threading.Thread(
            target=self._produce, args=(position, windows, stop), daemon=True
        )
        producer.start()
        try:
            yield from self._slice(position, windows)
        finally:
            stop.set()
            while producer.is_alive():
                try:
                    windows.get_nowait()
                except queue.Empty:
                    producer.join(timeout=0.05)

    def _slice(self, position: int, windows: queue.Queue) -> Iterator[Batch]:
        pending_acts: list[Tensor] = []
        pending_rows: list[Tensor] = []
        pending = 0
        while True:
            window = windows.get()
            if isinstance(window, BaseException):
                raise window
            skip = max(0, position - window.start)
            acts, rows = window.acts_ND[skip:], window.rows_N[skip:]
            while len(acts):
                take = min(self.batch_size - pending, len(acts))
                pending_acts.append(acts[:take])
                pending_rows.append(rows[:take])
                acts, rows = acts[take:], rows[take:]
                pending += take
                if pending == self.batch_size:
                    position += pending
                    yield Batch(_joined(pending_acts), _joined(pending_rows), position)
                    pending_acts, pending_rows, pending = [], [], 0

    def _produce(self, position: int, windows: queue.Queue, stop: threading.Event) -> None:
        """Build windows in stream order from the one holding `position`, a window ahead."""
        try:
            epoch = position // self.epoch_tokens
            with ThreadPoolExecutor(self.read_threads, thread_name_prefix="chunk-reader") as pool:
                while not stop.is_set():
                    start = epoch * self.epoch_tokens
                    for index, chunk_refs in enumerate(self.epoch_windows(epoch)):
                        size = sum(c.n_rows for c in chunk_refs) * self.tokens_per_image
                        if start + size <= position:
                            start += size
                            continue
                        window = self._window(pool, chunk_refs, start, (epoch, index))
                        while not stop.is_set():
                            try:
                                windows.put(window, timeout=0.1)
                                break
                            except queue.Full:
                                continue
                        if stop.is_set():
                            return
                        start += size
                    epoch += 1
        except BaseException as err:  # handed to the consumer, which raises it
            windows.put(err)

    def _window(
        self, pool: ThreadPoolExecutor, chunk_refs: list[ChunkRef], start: int, key: tuple
    ) -> _Window:
        """Read the chunks in parallel, each thread writing its tokens straight to their shuffled
        places: the window is the concatenation of the chunks' tokens, permuted by the seed."""
        sizes = [ref.n_rows * self.tokens_per_image for ref in chunk_refs]
        permutation = np.random.default_rng([self.seed, *key, 2**30]).permutation(sum(sizes))
        destination = np.empty_like(permutation)
        destination[permutation] = np.arange(len(permutation))
        acts = torch.empty(sum(sizes), self.cache.attrs.d_model, dtype=self.window_dtype)
        rows = torch.empty(sum(sizes), dtype=torch.long)
        offsets = np.cumsum([0, *sizes])

        def fill(i: int) -> None:
            where = torch.from_numpy(destination[offsets[i] : offsets[i + 1]])
            acts[where], rows[where] = self._read_tokens(chunk_refs[i])

        list(pool.map(fill, range(len(chunk_refs))))
        return _Window(start, acts, rows)

    def _read_tokens(self, ref: ChunkRef) -> tuple[Tensor, Tensor]:
        chunk_NTD = read_finite_chunk(self.cache, self.layer, ref, self.window_dtype)
        tokens = chunk_NTD[:, token_slice(self.tokens, chunk_NTD.shape[1])]
        rows = torch.arange(ref.first_row, ref.first_row + ref.n_rows)
        n, t, d = tokens.shape
        return tokens.reshape(n * t, d), rows.repeat_interleave(t)

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
            raise ValueError(f"{self.cache.path}: no held-out chunks; raise heldout_fraction")
        return torch.cat(acts)[:max_images], torch.cat(rows)[:max_images]


def read_finite_chunk(
    cache: Cache, layer: int, ref: ChunkRef, dtype: torch.dtype = torch.float32
) -> Tensor:
    """One whole chunk (n_rows, T, D); NaN or inf activations are a one-line error naming rows."""
    chunk_NTD = cache.read_chunk(layer, ref, dtype)
    if not all_finite(chunk_NTD):
        raise ValueError(
            f"{cache.path}: layer {layer}, rows {ref.first_row}..{ref.first_row + ref.n_rows - 1} "
            f"hold NaN or inf activations; re-cache shard {cache.attrs.shards[ref.shard_index]} "
            "or write a new cache"
        )
    return chunk_NTD


_EXPONENT_BITS = {torch.float16: (torch.int16, 0x7C00), torch.float32: (torch.int32, 0x7F800000)}
"""Per float dtype: the integer view and the mask of the exponent, all ones for NaN and inf."""


def all_finite(t: Tensor) -> bool:
    """No NaN or inf in `t`. float16 and float32 are checked through their exponent bits as
    integers, which the CPU vectorises; float16 arithmetic (abs, max) it does not."""
    if t.dtype not in _EXPONENT_BITS:
        return bool(torch.isfinite(t).all())
    int_dtype, mask = _EXPONENT_BITS[t.dtype]
    return t.numel() == 0 or int((t.view(int_dtype) & mask).max()) != mask


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


def _joined(parts: list[Tensor]) -> Tensor:
    """One tensor from the parts of a batch; a batch inside one window is a view, not a copy."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def token_slice(tokens: TokenChoice, n_tokens: int) -> slice:
    return {"all": slice(0, n_tokens), "cls": slice(0, 1), "patches": slice(1, n_tokens)}[tokens]


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
