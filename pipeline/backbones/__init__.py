"""One adapter per backbone family, behind two calls: `build` a model by name, and find its
`vit_parts` (the blocks to hook, their layout, the token layout), or one line saying it is no ViT.

Families: open_clip's own ViTs (`openclip`), open_clip's towers that wrap a timm ViT (SigLIP,
PE-Core, EVA02: their `trunk`), and timm's ViTs by name, 'timm:NAME' (`timm_vit`: DINOv2,
DINOv3, ...).
"""

from __future__ import annotations

from torch import nn

from vitscope.pipeline.backbones import openclip, timm_vit
from vitscope.pipeline.backbones.parts import Built, ViTParts
from vitscope.support.errors import BadSetting


def build(model: str, pretrained: str | None, seed: int) -> Built:
    """`model` with `pretrained` weights: a tag, a weights file, 'none' / 'none:seed=S' for
    random weights seeded by `seed` / S, or None for the model's default published weights."""
    family = timm_vit if model.startswith(timm_vit.PREFIX) else openclip
    if pretrained is None:
        pretrained = family.default_weights(model)
        if pretrained is None:
            raise BadSetting(
                f"{model} has no published weights to default to; pass a weights file, "
                "or 'none' for random weights"
            )
    return family.build(model, pretrained, seed)


def vit_parts(model: str, visual: nn.Module) -> ViTParts:
    """Where `visual`'s residual stream is; a one-line error for a tower that is not a ViT."""
    parts = openclip.vit_parts(visual) or timm_vit.trunk_parts(getattr(visual, "trunk", visual))
    if parts is None:
        tower = getattr(visual, "trunk", visual)
        raise BadSetting(
            f"{model}'s image tower is a {type(tower).__name__}, not a ViT: vitscope reads the "
            "residual stream of ViT blocks; pick a ViT (README 'Backbones')"
        )
    return parts
