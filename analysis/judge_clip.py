"""The offline sort-eval judge: the CLIP model itself. The query goes to the grid whose images'
final embeddings are, on average, the more cosine-similar to its own."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from PIL import Image

from vitscope.analysis.sorteval import Answer
from vitscope.pipeline.model import VisionTower
from vitscope.pipeline.shards import model_input


class ClipJudge:
    """Embeds with the vision tower's full forward (through its projection); caches by row."""

    name = "clip"

    def __init__(self, tower: VisionTower) -> None:
        self.tower = tower
        self.embedded: dict[bytes, torch.Tensor] = {}
        """Embeddings by image content: trials share many images (top images recur)."""

    @torch.inference_mode()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        keys = [hashlib.blake2b(image.tobytes(), digest_size=16).digest() for image in images]
        new = {
            key: image for key, image in zip(keys, images, strict=True) if key not in self.embedded
        }
        if new:
            pixels = torch.stack(
                [model_input(image, self.tower.preprocess) for image in new.values()]
            )
            out = self.tower.visual(pixels.to(self.tower.device, self.tower.dtype)).float()
            self.embedded.update(
                zip(new, torch.nn.functional.normalize(out, dim=-1).cpu(), strict=True)
            )
        return torch.stack([self.embedded[key] for key in keys])

    def answer(
        self, grid_a: Sequence[Image.Image], grid_b: Sequence[Image.Image], query: Image.Image
    ) -> Answer:
        """A or B: the grid whose mean cosine similarity to the query is higher."""
        embedded = self.embed([*grid_a, *grid_b, query])
        a, b, q = embedded[: len(grid_a)], embedded[len(grid_a) : -1], embedded[-1]
        return "A" if float((a @ q).mean()) >= float((b @ q).mean()) else "B"
