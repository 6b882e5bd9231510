"""vitscope: encode images through a ViT once into a Zarr activation cache, then train SAEs on it.

From Python:

    import vitscope
    sae = vitscope.load_sae("runs/layer20")          # a folder, a CLIP-Scope .pt, or a hub id
    codes = sae.encode(acts)                          # acts (..., d_in), in their own units
    feats = vitscope.features(images, sae)            # PIL images -> features per patch

`vitscope.pipeline` (stage one) writes caches, `vitscope.cache_spec` is the on-disk contract,
`vitscope.saes` is the SAE itself (architectures, sparse kernels, card, folder format) and
loads, converts and publishes SAEs, `vitscope.train` (stage two) trains them from a cache;
`vitscope.cli` is the command line. Names below are imported on first use, so `import vitscope`
stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vitscope.api import ImageFeatures, features
    from vitscope.pipeline.activations import ViTActivations
    from vitscope.saes.architectures.topk import TopKSAE
    from vitscope.saes.load import load_sae
    from vitscope.saes.sae import SAE, SparseCodes

_EXPORTS = {
    "load_sae": "vitscope.saes.load",
    "ViTActivations": "vitscope.pipeline.activations",
    "features": "vitscope.api",
    "ImageFeatures": "vitscope.api",
    "SAE": "vitscope.saes.sae",
    "TopKSAE": "vitscope.saes.architectures.topk",
    "SparseCodes": "vitscope.saes.sae",
}

__all__ = [
    "SAE",
    "ImageFeatures",
    "SparseCodes",
    "TopKSAE",
    "ViTActivations",
    "features",
    "load_sae",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vitscope' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
