"""timm's ViTs: `VisionTransformer` (DINOv2, SigLIP's trunk, ...) and `Eva` (DINOv3, EVA02,
PE-Core), used directly as `timm:NAME` or inside open_clip's `TimmModel`.

Both put the prefix tokens first, CLS then registers (`_pos_embed`), then the patches in raster
order, and run `blocks` batch first. A direct timm model is built with `num_classes=0`, so its
forward gives the pooled, normed output (DINO's final CLS) as the image embedding; its
preprocessing is timm's own data config for it. `timm:NAME@SIZE` builds it for SIZE-pixel inputs
(timm resamples the position embeddings of published weights to fit).
"""

from __future__ import annotations

import os

from torch import nn

from vitscope.cache_spec.tokens import CLS, TokenLayout
from vitscope.pipeline.backbones.parts import (
    RANDOM,
    Built,
    ViTParts,
    import_timm,
    random_seed,
    seeded,
)
from vitscope.support.errors import BadSetting, Unreachable

PREFIX = "timm:"
"""How a model name asks for timm: 'timm:vit_base_patch14_dinov2'."""


def parse_name(model: str) -> tuple[str, int | None]:
    """'timm:NAME' or 'timm:NAME@SIZE' -> (NAME, SIZE or None), checked against timm's list."""
    name, _, size = model.removeprefix(PREFIX).partition("@")
    if not import_timm().is_model(name):
        raise BadSetting(
            f"unknown timm model {name!r} in {model!r}: expected a name from timm.list_models(), "
            "e.g. timm:vit_base_patch14_dinov2"
        )
    if size and not (size.isdigit() and int(size) > 0):
        raise BadSetting(
            f"{model!r}: expected timm:NAME@SIZE with SIZE the input side in pixels, "
            f"found {size!r}; e.g. timm:{name}@224"
        )
    return name, int(size) if size else None


def default_weights(model: str) -> str | None:
    """timm's default pretrained tag of the model (e.g. 'lvd142m' for DINOv2)."""
    name, _ = parse_name(model)
    cfg = import_timm().models.get_pretrained_cfg(name)
    return cfg.tag if cfg is not None and cfg.tag else None


def build(model: str, pretrained: str, seed: int) -> Built:
    """A timm model without its classifier, and timm's inference transform for it."""
    name, size = parse_name(model)
    timm = import_timm()
    kwargs: dict = {"num_classes": 0, **({"img_size": size} if size else {})}
    seed_ = random_seed(pretrained, seed)
    if seed_ is not None:
        with seeded(seed_):
            net = timm.create_model(name, pretrained=False, **kwargs)
        pretrained = f"{RANDOM}:seed={seed_}"
    elif os.path.exists(pretrained):
        overlay = {"file": os.path.abspath(pretrained)}
        net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    else:
        net = _published(name, pretrained, kwargs)
    return Built(net.eval(), _transform(net), pretrained)


def _published(name: str, tag: str, kwargs: dict) -> nn.Module:
    timm = import_timm()
    tags = [full.partition(".")[2] for full in timm.list_pretrained(f"{name}.*")]
    if tag not in tags:
        raise BadSetting(
            f"{tag!r} is neither a weights file nor a pretrained tag of timm:{name} "
            f"({', '.join(tags) or 'none'}); pass '{RANDOM}' for random weights"
        )
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return timm.create_model(f"{name}.{tag}", pretrained=True, **kwargs)
    except LocalEntryNotFoundError:
        raise Unreachable(
            f"timm:{name} ({tag}): expected its weights in the local cache or from the hub, "
            "found neither (offline?); run once online so timm caches them, or pass a "
            "weights file instead of the tag"
        ) from None


def _transform(net: nn.Module):
    """timm's eval transform for `net`, at the input size its patch embedding was built for
    (the data config keeps the published size when `@SIZE` changed it)."""
    timm = import_timm()
    config = timm.data.resolve_model_data_config(net)
    embed = getattr(net, "patch_embed", None)
    if embed is not None and getattr(embed, "img_size", None):
        config["input_size"] = (3, *embed.img_size)
    return timm.data.create_transform(**config, is_training=False)


def trunk_parts(trunk: nn.Module) -> ViTParts | None:
    """A timm ViT's blocks and layout: prefix 'cls' (if any), 'reg0'.., then its patch grid;
    None when `trunk` is not one (a ConvNeXt, a ResNet)."""
    blocks = getattr(trunk, "blocks", None)
    grid = getattr(getattr(trunk, "patch_embed", None), "grid_size", None)
    if not isinstance(blocks, nn.ModuleList | nn.Sequential) or grid is None:
        return None
    registers = getattr(trunk, "reg_token", None)
    n_registers = 0 if registers is None else registers.shape[1]
    has_cls = getattr(trunk, "cls_token", None) is not None
    prefix = (CLS,) * has_cls + tuple(f"reg{i}" for i in range(n_registers))
    if len(prefix) != getattr(trunk, "num_prefix_tokens", len(prefix)):
        return None
    return ViTParts(
        blocks=blocks,
        batch_first=True,
        d_model=trunk.embed_dim,
        image_size=trunk.patch_embed.img_size[0],
        layout=TokenLayout(prefix, tuple(grid)),
    )
