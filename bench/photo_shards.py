"""Webdataset shards shaped like img2dataset's output, made offline from scikit-image's photos.

Benchmarks need many distinct real images without internet. scikit-image ships 24 photos; each is
turned into as many variants as needed (seeded crops, flips, resized to a square), then written as
img2dataset writes a shard: `00000.tar` holding `KEY.jpg` (JPEG, quality 95), `KEY.txt` (caption)
and `KEY.json` ({"url", "caption", "key", ...}) per sample in key order, plus `00000_stats.json`
beside it. Keys are img2dataset's: shard number (5 digits) then sample number (4 digits).

    from photo_shards import write_photo_shards
    shards_dir = write_photo_shards(Path("/tmp/shards"), n_images=128, shard_size=64)
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from vitscope.demo import PHOTO_CAPTIONS, photo_dir

JPEG_QUALITY = 95
"""img2dataset's default encode_quality."""


@dataclass(frozen=True)
class PhotoSample:
    """One image of a shard: its JPEG bytes, caption and made-up source URL."""

    jpeg: bytes
    caption: str
    url: str


def load_photos() -> dict[str, Image.Image]:
    """scikit-image's bundled photos as RGB images, by file name."""
    folder = photo_dir()
    photos = {}
    for name in sorted(PHOTO_CAPTIONS):
        with Image.open(folder / name) as image:
            photos[name] = image.convert("RGB")
    return photos


def variant(photo: Image.Image, index: int, size: int) -> Image.Image:
    """Variant 0 is img2dataset's center crop; later ones are seeded crops, half of them flipped."""
    if index == 0:
        return ImageOps.fit(photo, (size, size), Image.Resampling.BICUBIC)
    rng = random.Random(index)
    width, height = photo.size
    side = int(min(width, height) * rng.uniform(0.5, 1.0))
    left = rng.randint(0, width - side)
    top = rng.randint(0, height - side)
    crop = photo.crop((left, top, left + side, top + side))
    if index % 2:
        crop = ImageOps.mirror(crop)
    if index % 4 == 2:
        crop = ImageOps.flip(crop)
    return crop.resize((size, size), Image.Resampling.BICUBIC)


def photo_samples(n_images: int, size: int = 224) -> Iterator[PhotoSample]:
    """`n_images` distinct JPEGs: every photo once, then further variants of each in turn."""
    photos = load_photos()
    names = list(photos)
    seen: set[bytes] = set()
    attempt = 0
    while len(seen) < n_images:
        name = names[attempt % len(names)]
        index = attempt // len(names)
        attempt += 1
        buffer = io.BytesIO()
        variant(photos[name], index, size).save(buffer, "JPEG", quality=JPEG_QUALITY)
        digest = hashlib.sha256(buffer.getvalue()).digest()
        if digest in seen:
            continue
        seen.add(digest)
        kind = "center crop" if index == 0 else f"variant {index}"
        yield PhotoSample(
            jpeg=buffer.getvalue(),
            caption=f"{PHOTO_CAPTIONS[name]} ({kind})",
            url=f"http://127.0.0.1/{name}?variant={index}",
        )


def _add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, shard_number: int, samples: list[PhotoSample]) -> None:
    """One tar in img2dataset's layout, and its _stats.json beside it."""
    now = time.time()
    with tarfile.open(path, "w") as tar:
        for i, sample in enumerate(samples):
            key = f"{shard_number:05d}{i:04d}"
            meta = {
                "url": sample.url,
                "caption": sample.caption,
                "key": key,
                "status": "success",
                "error_message": None,
            }
            _add_member(tar, f"{key}.jpg", sample.jpeg, now)
            _add_member(tar, f"{key}.txt", sample.caption.encode(), now)
            _add_member(tar, f"{key}.json", json.dumps(meta).encode(), now)
    stats = {"count": len(samples), "successes": len(samples), "failed_to_download": 0}
    path.with_name(f"{path.stem}_stats.json").write_text(json.dumps(stats))


def write_photo_shards(out: Path, n_images: int, shard_size: int, image_size: int = 224) -> Path:
    """Write `n_images` distinct photos into shards of `shard_size` samples; returns `out`."""
    if n_images < 1 or shard_size < 1:
        raise ValueError("n_images and shard_size must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    batch: list[PhotoSample] = []
    shard_number = 0
    for sample in photo_samples(n_images, image_size):
        batch.append(sample)
        if len(batch) == shard_size:
            write_shard(out / f"{shard_number:05d}.tar", shard_number, batch)
            batch, shard_number = [], shard_number + 1
    if batch:
        write_shard(out / f"{shard_number:05d}.tar", shard_number, batch)
    return out
