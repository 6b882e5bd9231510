"""`--decode device`: a batch's image bytes -> the tower's input, decoded and resized on its device.

DataLoader workers only read the bytes (`ShardImages` without a preprocess); `DeviceDecoder` turns
a batch of them into pixels in the main process. On a CUDA device the JPEGs of a batch go to
torchvision's `decode_jpeg` in one nvJPEG call; an image nvJPEG does not take (PNG or WebP bytes)
or raises on (corrupt data, a JPEG variant it lacks) falls back to PIL for that image alone, and
one PIL cannot decode either is skipped and counted with the reason the PIL path records. On the
CPU every image is decoded by PIL: torchvision's CPU decoder is libjpeg-turbo too, so it gains
nothing, and on the CPU-torch / CUDA-torchvision pair `make install` builds it does not even load
("Couldn't load the image extension"). Resize, crop and normalisation are then tensor code on the
device with the very transform objects of open_clip's `tower.preprocess` (bicubic, antialiased,
shortest side first, its own mean and std): the same code whichever device decoded.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vitscope.pipeline.dataset import ShardBatch
from vitscope.pipeline.model import VisionTower, import_open_clip
from vitscope.pipeline.shards import SampleRecord, decode_with_pil
from vitscope.support.errors import BadSetting

OPEN_CLIP_STEPS = ("Resize", "CenterCrop", "MaybeConvertMode", "MaybeToTensor", "Normalize")
"""open_clip's inference transform, step by step: the one shape rebuilt here as tensor code."""

JPEG_MAGIC = b"\xff\xd8\xff"


def pil_pixels(image: Image.Image) -> Tensor:
    """An image as open_clip's PIL path sees it before resizing (RGB), as a uint8 (3, H, W)."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


class DeviceDecoder:
    """open_clip's preprocessing of `tower`, run on uint8 tensors on the tower's device."""

    def __init__(self, tower: VisionTower) -> None:
        steps = list(tower.preprocess.transforms)
        names = tuple(type(step).__name__ for step in steps)
        if names != OPEN_CLIP_STEPS:
            raise BadSetting(
                f"--decode device rebuilds open_clip's {' | '.join(OPEN_CLIP_STEPS)} on tensors; "
                f"{tower.model}'s transform is {' | '.join(names)}: use --decode pil"
            )
        self.resize, self.crop, _, _, self.normalize = steps
        self.device = tower.device
        self.image_size = tower.image_size

    def __call__(self, batch: ShardBatch) -> ShardBatch:
        """The batch with its bytes decoded and preprocessed; an image nothing decodes is
        skipped, the reason in its record."""
        records = [record for record in batch.records if record.error is None]
        if len(records) != len(batch.encoded):
            raise ValueError(f"{len(batch.encoded)} images for {len(records)} usable records")
        decoded = self.decode(records, batch.encoded)
        images = self.preprocess([image for image in decoded if image is not None])
        return replace(batch, images_BCHW=images, encoded=[])

    def decode(self, records: list[SampleRecord], encoded: list[bytes]) -> list[Tensor | None]:
        """uint8 (3, H, W) images on the device, None where neither nvJPEG nor PIL could."""
        decoded: list[Tensor | None] = [None] * len(encoded)
        if self.device.type == "cuda":
            jpegs = [i for i, data in enumerate(encoded) if data.startswith(JPEG_MAGIC)]
            for i, image in zip(jpegs, self._nvjpeg([encoded[i] for i in jpegs]), strict=True):
                decoded[i] = image
        for i, (record, data) in enumerate(zip(records, encoded, strict=True)):
            if decoded[i] is None:
                image = decode_with_pil(record, data, pil_pixels)
                decoded[i] = None if image is None else image.to(self.device, non_blocking=True)
        return decoded

    def preprocess(self, images_CHW: list[Tensor]) -> Tensor:
        """Resize and crop each uint8 image (one call per distinct size), then scale to [0, 1]
        and normalise the batch: float32 (B, 3, S, S) on the device."""
        if not images_CHW:
            return torch.empty(0, 3, self.image_size, self.image_size, device=self.device)
        by_size: defaultdict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, image in enumerate(images_CHW):
            by_size[tuple(image.shape)].append(i)
        cropped: dict[int, Tensor] = {}
        for same in by_size.values():
            group = self.crop(self.resize(torch.stack([images_CHW[i] for i in same])))
            cropped.update(zip(same, group, strict=True))
        pixels = torch.stack([cropped[i] for i in range(len(images_CHW))])
        return self.normalize(pixels.float().div_(255))

    def _nvjpeg(self, encoded: list[bytes]) -> list[Tensor | None]:
        """One batched nvJPEG call; if it raises, each image alone, None for those that fail."""
        import_open_clip()  # torchvision imports only through its workaround
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in encoded]
        if not data:
            return []
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            alone: list[Tensor | None] = []
            for one in data:
                try:
                    alone.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    alone.append(None)
            return alone
