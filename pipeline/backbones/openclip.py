"""open_clip's models: its own `VisionTransformer` (OpenAI-style CLIP), and the towers it wraps
from timm (`TimmModel`: SigLIP, SigLIP2, PE-Core, EVA02, MobileCLIP2-B), whose trunk
`timm_vit.trunk_parts` reads."""

from __future__ import annotations

import os
from collections.abc import Callable

from torch import Tensor, nn

from vitscope.cache_spec.tokens import CLS, TokenLayout
from vitscope.pipeline.backbones.parts import (
    RANDOM,
    Built,
    ViTParts,
    import_open_clip,
    random_seed,
    seeded,
)
from vitscope.support.errors import BadSetting, Unreachable


def check_model(model: str) -> None:
    if model not in import_open_clip().list_models():
        raise BadSetting(
            f"unknown open_clip model {model!r}; see open_clip.list_models(), or name a timm "
            "model as timm:NAME (timm.list_models())"
        )


def default_weights(model: str) -> str | None:
    """open_clip's first pretrained tag of `model` (what its model list shows first)."""
    check_model(model)
    return next(iter(import_open_clip().list_pretrained_tags_by_model(model)), None)


def build(model: str, pretrained: str, seed: int) -> Built:
    """The whole open_clip model (image and text towers) and its preprocessing."""
    check_model(model)
    open_clip = import_open_clip()
    seed_ = random_seed(pretrained, seed)
    if seed_ is None and not os.path.exists(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model)
        if pretrained not in tags:
            raise BadSetting(
                f"{pretrained!r} is neither a weights file nor a pretrained tag of {model} "
                f"({', '.join(tags) or 'none'}); pass '{RANDOM}' for random weights"
            )
    with seeded(seed if seed_ is None else seed_):
        try:
            clip, _, preprocess = open_clip.create_model_and_transforms(
                model, pretrained=None if seed_ is not None else pretrained
            )
        except RuntimeError as err:  # open_clip wraps every download failure in one
            if "Failed to download" not in str(err):
                raise
            raise Unreachable(
                f"{model} ({pretrained}): expected its weights in the local cache or from the "
                "hub, found neither (offline?); run once online so open_clip caches them, or "
                "pass a weights file instead of the tag"
            ) from None
    recorded = pretrained if seed_ is None else f"{RANDOM}:seed={seed_}"
    return Built(clip.visual, preprocess, recorded, clip, lambda: tokenizer(model))


def tokenizer(model: str) -> Callable[[list[str]], Tensor]:
    """open_clip's tokenizer for `model`; SigLIP's and others' are fetched from the hub."""
    try:
        return import_open_clip().get_tokenizer(model)
    except OSError:  # transformers' words for "not cached and the hub is unreachable"
        raise Unreachable(
            f"{model}: expected its text tokenizer in the local cache or from the hub, found "
            "neither (offline?); run once online so it is cached"
        ) from None


def vit_parts(visual: nn.Module) -> ViTParts | None:
    """open_clip's own ViT: blocks `transformer.resblocks`, always a class token at 0."""
    transformer = getattr(visual, "transformer", None)
    if transformer is None or not hasattr(transformer, "resblocks"):
        return None
    size = visual.image_size
    return ViTParts(
        blocks=transformer.resblocks,
        batch_first=getattr(transformer, "batch_first", True),
        d_model=transformer.width,
        image_size=size[0] if isinstance(size, tuple) else size,
        layout=TokenLayout((CLS,), tuple(visual.grid_size)),
    )
