"""Read img2dataset's webdataset shards: samples grouped by key, images decoded or rejected.

A plain `tarfile` stream rather than webdataset's pipeline: a truncated or corrupt tar must fail
its own shard with the tar's own message, and a bad image must be skipped and named, never
swallowed by a generic error handler.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from vitscope.support.errors import MissingInput

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class ShardReadError(Exception):
    """The tar itself is unreadable (truncated, corrupt, empty file): the shard cannot be cached."""


@dataclass
class SampleRecord:
    """One sample of a shard as the row table records it; `error` is set when it was skipped."""

    key: str
    url: str | None
    caption: str | None
    error: str | None = None


def list_shards(shards_dir: Path) -> list[Path]:
    """The .tar shards of a folder, by name; a one-line error if there are none."""
    if not shards_dir.is_dir():
        raise MissingInput(f"{shards_dir}: no such folder of shards; run `vitscope download`")
    found = sorted(shards_dir.glob("*.tar"))
    if not found:
        raise MissingInput(f"{shards_dir}: no .tar shards in it; run `vitscope download`")
    return found


def expected_images(shard: Path) -> int | None:
    """Images img2dataset says it wrote into a shard (its _stats.json), for the progress bar."""
    stats = shard.with_name(f"{shard.stem}_stats.json")
    try:
        return int(json.loads(stats.read_text())["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_samples(shard: Path) -> Iterator[dict[str, bytes]]:
    """Members of a tar grouped by key ('000123.jpg' + '000123.txt' -> one dict), in tar order."""
    try:
        with tarfile.open(shard, "r|") as tar:
            sample: dict[str, bytes] = {}
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                if sample and sample["__key__"] != key.encode():
                    yield sample
                    sample = {}
                sample["__key__"] = key.encode()
                sample[ext.lower()] = tar.extractfile(member).read()  # type: ignore[union-attr]
            if sample:
                yield sample
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ShardReadError(f"{shard}: unreadable tar ({err}); re-download this shard") from None


def model_input(
    image: Image.Image, preprocess: Callable[[Image.Image], torch.Tensor]
) -> torch.Tensor:
    """The tensor the vision tower sees for one image: RGB, then open_clip's own transform. Stage
    one and `vitscope.ViTActivations` both call this, so they feed the model the same pixels."""
    return preprocess(image.convert("RGB"))


def sample_record(sample: dict[str, bytes]) -> tuple[SampleRecord, bytes | None]:
    """One sample's record and its image bytes; no bytes (and the reason in the record) when the
    sample holds no image."""
    meta = _json(sample.get("json"))
    record = SampleRecord(
        key=sample["__key__"].decode(),
        url=meta.get("url"),
        caption=sample["txt"].decode("utf-8", "replace")
        if "txt" in sample
        else meta.get("caption"),
    )
    data = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if data is None:
        record.error = "no image in sample"
    return record, data


def decode_with_pil(
    record: SampleRecord, data: bytes, transform: Callable[[Image.Image], torch.Tensor]
) -> torch.Tensor | None:
    """`transform` of the decoded image; None, with the reason in the record, when PIL cannot
    decode it. Both decode paths end here for a bad image, so both record the same reason."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return transform(image)
    except Exception as err:  # PIL raises many types for bad bytes; all mean "skip this one"
        record.error = f"undecodable image: {type(err).__name__}: {err}"
        return None


def _json(data: bytes | None) -> dict:
    if data is None:
        return {}
    try:
        parsed = json.loads(data)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}
