"""`vitscope cache-info --verify`: read every committed chunk of every layer, name the damaged.

Opening a cache checks its records, not its chunk files: a truncated or overwritten chunk shows
only when a pass reaches it, hours in. Verifying decodes each one as stage two would
(`Cache.read_chunk`), so what it reports is exactly what a pass would trip over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from vitscope.cache_spec.errors import CacheSpecError
from vitscope.cache_spec.store import Cache


def damaged_chunks(cache: Cache) -> Iterator[CacheSpecError]:
    """The error of each committed chunk that does not read whole, layer by layer, in row order."""
    from tqdm import tqdm

    refs = cache.chunks()
    with tqdm(total=len(refs) * len(cache.attrs.layers), unit="chunk", desc="verify") as progress:
        for layer in cache.attrs.layers:
            for ref in refs:
                try:
                    cache.read_chunk(layer, ref)
                except CacheSpecError as err:
                    yield err
                progress.update()


def verify_chunks(cache: Cache, report: Callable[[str], None]) -> str:
    """Hand `report` a line per damaged chunk as it is found; then a `CacheSpecError` counting
    them if any, else the line saying what was verified."""
    damaged = 0
    for error in damaged_chunks(cache):
        report(f"damaged: {error}")
        damaged += 1
    read = len(cache.chunks()) * len(cache.attrs.layers)
    if damaged:
        raise CacheSpecError(
            cache.path,
            f"{read} committed chunks that decode",
            f"{damaged} damaged (listed above)",
            fix="rewrite the shards they name, as each line says",
        )
    layers = ", ".join(map(str, cache.attrs.layers))
    return f"verified: all {read} committed chunks (layers {layers}) decode"
