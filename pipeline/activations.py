"""`ViTActivations`: the residual stream of chosen layers for images in memory, for people who
use SAEs from Python. It is stage one's own path: the same model loading, the same preprocessing
(`shards.model_input`) and the same hooks (`model.residual_stream`), so its activations equal a
cache's rows for the same image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from vitscope.cache_spec.tokens import TokenLayout
from vitscope.pipeline.model import ModelDtype, load_vision_tower, residual_stream
from vitscope.pipeline.shards import model_input
from vitscope.support.devices import resolve_device
from vitscope.support.errors import BadSetting


class ViTActivations:
    """`acts = ViTActivations("ViT-L-14", "laion2b_s32b_b82k", [20])(images)` -> {20: (N, T, D)}.

    `model` is any ViT vitscope caches: an open_clip name or 'timm:NAME' (README "Backbones").
    `pretrained` is as `vitscope cache --pretrained` takes it; None means the model's default
    published weights (open_clip's first tag, timm's default tag). Images are PIL images (any
    mode; converted to RGB and preprocessed as stage one does) or an already preprocessed
    (N, 3, H, W) tensor. Activations come back in the model's dtype on its device (bfloat16 on a
    GPU, float32 on the CPU, as `vitscope cache` runs it); `layout` says which token is what.
    """

    def __init__(
        self,
        model: str = "ViT-L-14",
        pretrained: str | None = "laion2b_s32b_b82k",
        layers: Sequence[int] = (20,),
        device: str = "auto",
        dtype: ModelDtype = "auto",
        seed: int = 0,
    ) -> None:
        self.tower = load_vision_tower(model, pretrained, resolve_device(device), dtype, seed)
        self.layers = sorted(set(layers))
        bad = [layer for layer in self.layers if not 0 <= layer < self.tower.n_blocks]
        if bad or not self.layers:
            raise BadSetting(
                f"layers must lie in 0..{self.tower.n_blocks - 1} ({model} has "
                f"{self.tower.n_blocks} blocks), not {list(layers)}"
            )

    @property
    def layout(self) -> TokenLayout:
        """The T tokens of each image: prefix tokens (CLS, registers; none for SigLIP), then
        the patch grid in raster order."""
        return self.tower.layout

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, 3, H, W) model inputs, exactly as stage one prepares them."""
        return torch.stack([model_input(image, self.tower.preprocess) for image in images])

    def __call__(
        self, images: Sequence[Image.Image] | torch.Tensor, batch_size: int = 64
    ) -> dict[int, torch.Tensor]:
        """{layer: (N, T, D)} for every requested layer, tokens in `layout`'s order."""
        parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            pixels = batch if isinstance(batch, torch.Tensor) else self.preprocess(batch)
            for layer, acts in residual_stream(self.tower, pixels, self.layers).items():
                parts[layer].append(acts)
        return {layer: torch.cat(chunks) for layer, chunks in parts.items()}
