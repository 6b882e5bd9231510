"""The Python API's one computation of its own: an SAE's features on images.

Everything else `import vitscope` offers is re-exported from where it lives: `load_sae`
(vitscope.saes.load), `ViTActivations` (vitscope.pipeline.activations), `SAE` and
`SparseCodes` (vitscope.saes.sae), `TopKSAE` (vitscope.saes.architectures.topk).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from PIL import Image

from vitscope.pipeline.activations import ViTActivations
from vitscope.saes.sae import SAE, SparseCodes
from vitscope.support.errors import BadSetting


@dataclass
class ImageFeatures:
    """An SAE's features on N images of T tokens: the model's prefix tokens (CLS and registers,
    where it has them; none in SigLIP), then the patches in raster order, as the cache's
    `attrs.token_layout` (a `TokenLayout`) names them."""

    codes: SparseCodes
    """Per image and token, the active features by value, largest first: (N, T, K)."""

    def image_top(self, n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, the n features with the largest activation on any token: (N, n) indices
        and values, largest first."""
        indices, values = self.codes.indices, self.codes.values
        n_images = indices.shape[0]
        peak_NF = values.new_zeros(n_images, self.codes.n_latents).scatter_reduce(
            1, indices.reshape(n_images, -1), values.reshape(n_images, -1), "amax"
        )
        top = peak_NF.topk(n, dim=1)
        return top.indices, top.values

    def heatmap(self, feature: int) -> torch.Tensor:
        """One feature's activation on every token of every image, (N, T), zero where off."""
        on = self.codes.indices == feature
        return (self.codes.values * on).sum(dim=-1)


def features(
    images: Sequence[Image.Image] | torch.Tensor,
    sae: SAE,
    activations: ViTActivations | None = None,
) -> ImageFeatures:
    """Per image and per patch, the SAE's active features and their values.

    The vision tower is the one the SAE's card names (loaded once per process), unless
    `activations` is given, e.g. for an SAE whose card does not record its model.
    """
    card = sae.card
    if activations is None:
        if card.model is None or card.pretrained is None or card.layer is None:
            raise BadSetting(
                f"{sae.describe()} does not record its model, weights and layer; pass "
                "activations=vitscope.ViTActivations(model, pretrained, [layer])"
            )
        activations = _tower(card.model, card.pretrained, card.layer, str(sae.b_pre.device))
    if card.layer is not None and card.layer not in activations.layers:
        raise BadSetting(
            f"{sae.describe()} reads layer {card.layer}, but the activations give layers "
            f"{activations.layers}; pass ViTActivations(..., layers=[{card.layer}])"
        )
    if card.layer is None and len(activations.layers) > 1:
        raise BadSetting(
            f"{sae.describe()} does not record its layer and the activations give "
            f"{activations.layers}; pass ViTActivations with the one layer it was trained on"
        )
    layer = card.layer if card.layer is not None else activations.layers[0]
    acts_NTD = activations(images)[layer]
    with torch.no_grad():
        return ImageFeatures(sae.encode(acts_NTD).by_value())


@lru_cache(maxsize=2)
def _tower(model: str, pretrained: str, layer: int, device: str) -> ViTActivations:
    return ViTActivations(model, pretrained, [layer], device=device)
