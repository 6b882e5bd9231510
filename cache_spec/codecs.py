"""Named compression presets for the layer arrays; the default was chosen by measurement.

bench/codecs.py measures bytes per value, write and read MB/s of each preset on real activations
(BENCHMARKS.md has the table). A cache records its preset's name, and zarr records the codecs
themselves in each array's zarr.json, so a reader needs neither.
"""

from __future__ import annotations

from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, ZstdCodec

from vitscope.support.errors import BadSetting

CODECS: dict[str, tuple[BytesBytesCodec, ...]] = {
    "none": (),
    "zstd-1": (ZstdCodec(level=1),),
    "zstd-3": (ZstdCodec(level=3),),
    "blosc-lz4-shuffle": (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),),
    "blosc-zstd1-shuffle": (BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),),
    "blosc-zstd1-bitshuffle": (BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"),),
}

DEFAULT_CODEC = "zstd-1"
"""8% smaller than raw float16 at ~0.7 GB/s of decoding per thread (BENCHMARKS.md, codec table)."""


def compressors(name: str) -> tuple[BytesBytesCodec, ...]:
    """The zarr compressors of a preset; a one-line error lists the presets if the name is wrong."""
    if name not in CODECS:
        raise BadSetting(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}")
    return CODECS[name]
