"""Load a ViT of any family (`backbones`) and read its residual stream after chosen blocks, in
one pass.

Layer L is the output of transformer block L (0-indexed), every token, in the order the tower's
`layout` names (CLIP: CLS at 0, then the patches): the convention of CLIP-Scope's published SAEs.
The forward pass stops after the deepest requested block, so caching layers 2..22 of ViT-L-14
never runs blocks 23, ln_post or the projection. The same block hook can instead replace a
block's output and run on to the image embedding (`spliced_forward`), so a splice eval edits
exactly the activations the cache holds. `load_image_encoder` loads any model's image tower, ViT
or not, for its embeddings only (the MonoSemanticity Score's similarities).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from torch import Tensor, nn

from vitscope.cache_spec.tokens import TokenLayout
from vitscope.pipeline import backbones
from vitscope.pipeline.backbones import timm_vit
from vitscope.pipeline.backbones.parts import import_open_clip as import_open_clip
from vitscope.support.errors import BadSetting

ModelDtype = Literal["auto", "float32", "bfloat16", "float16"]
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class VisionTower:
    """A ViT ready to run, with what the cache spec records about it."""

    visual: nn.Module
    """Pixels -> final image embeddings: the module a splice runs on to the end."""
    preprocess: Callable[[Image.Image], Tensor]
    """The model's own inference transform (open_clip's, or timm's data config)."""
    model: str
    pretrained: str
    """The tag or file the weights came from, or 'none:seed=S' for seeded random weights."""
    dtype: torch.dtype
    device: torch.device
    blocks: nn.ModuleList | nn.Sequential
    """The transformer blocks whose outputs are the residual stream."""
    batch_first: bool
    """Whether the blocks' outputs are (B, T, D); open_clip's older towers run (T, B, D)."""
    layout: TokenLayout
    """Which token is what: the prefix tokens (CLS, registers), then the patch grid."""
    d_model: int
    image_size: int

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def n_tokens(self) -> int:
        return self.layout.n_tokens


def resolve_dtype(dtype: ModelDtype, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on a GPU and float32 on the CPU, where bfloat16 is often emulated."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _TORCH_DTYPES[dtype]


def load_vision_tower(
    model: str,
    pretrained: str | None,
    device: str = "cpu",
    dtype: ModelDtype = "auto",
    seed: int = 0,
) -> VisionTower:
    """Build `model` with `pretrained` weights ('none' for random ones seeded by `seed`).

    `model` is an open_clip model name or 'timm:NAME' (README "Backbones"). `pretrained` is a tag
    of the model's library (fetched from the hub when online), a local weights file, 'none', or
    'none:seed=S' as a cache or SAE card records random weights (S overrides `seed`), or None for
    the model's default published weights.
    """
    return _vision_tower(backbones.build(model, pretrained, seed), model, device, dtype)


@dataclass
class ClipModel:
    """The vision tower with the text side of its CLIP model, for zero-shot classification;
    `encode_text` and `tokenizer` are None for a model without one (timm's)."""

    tower: VisionTower
    encode_text: Callable[[Tensor], Tensor] | None
    """Token ids (N, context) -> text embeddings (N, E), in the image embeddings' space."""
    tokenizer: Callable[[list[str]], Tensor] | None
    """Texts -> token ids (N, context) on the CPU."""


def load_clip(
    model: str,
    pretrained: str | None,
    device: str = "cpu",
    dtype: ModelDtype = "auto",
    seed: int = 0,
) -> ClipModel:
    """`load_vision_tower`'s tower (same weights, same seed rules) and its model's text tower."""
    built = backbones.build(model, pretrained, seed)
    tower = _vision_tower(built, model, device, dtype)
    if built.clip is None:
        return ClipModel(tower, None, None)
    clip = built.clip.to(device=tower.device, dtype=tower.dtype).eval().requires_grad_(False)
    return ClipModel(tower, clip.encode_text, built.tokenizer())


@dataclass
class TextTower:
    """An open_clip model's text side, whatever its image tower: prompts -> embeddings in the
    space of its image embeddings (features named in words, `vitscope search`)."""

    clip: nn.Module
    """The whole open_clip model; `clip.encode_text(ids, normalize=True)` embeds."""
    tokenizer: Callable[[list[str]], Tensor]
    """Texts -> token ids (N, context) on the CPU."""
    device: torch.device


def has_text_tower(model: str) -> bool:
    """Every open_clip model has one (CLIP, SigLIP, PE-Core, CoCa, ...); timm's ViTs have none."""
    return not model.startswith(timm_vit.PREFIX)


def load_text_tower(
    model: str, pretrained: str, device: str = "cpu", dtype: ModelDtype = "auto", seed: int = 0
) -> TextTower:
    """`model`'s text tower with `pretrained` weights (the same rules and seed as
    `load_vision_tower`, so random weights match the image tower a cache was made with)."""
    built = backbones.build(model, pretrained, seed)
    if built.clip is None or built.tokenizer is None:
        raise BadSetting(f"{model} has no text tower; only a CLIP-family model embeds text")
    torch_device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    clip = built.clip.to(device=torch_device, dtype=torch_dtype).eval().requires_grad_(False)
    return TextTower(clip, built.tokenizer(), torch_device)


@dataclass
class ImageEncoder:
    """Any model's image tower (a ViT or not), for final image embeddings only."""

    visual: nn.Module
    preprocess: Callable[[Image.Image], Tensor]
    model: str
    pretrained: str
    """As `VisionTower.pretrained` records it ('none:seed=S' for seeded random weights)."""
    dtype: torch.dtype
    device: torch.device
    image_size: int = 0
    """Side of its preprocessed input images."""
    embed_dim: int = 0
    """Width E of its embeddings."""

    @torch.inference_mode()
    def embed(self, images_BCHW: Tensor) -> Tensor:
        """(B, E) float32 unit-norm embeddings of preprocessed images."""
        pixels = images_BCHW.to(device=self.device, dtype=self.dtype, non_blocking=True)
        return nn.functional.normalize(self.visual(pixels).float(), dim=-1)


def load_image_encoder(
    model: str,
    pretrained: str | None,
    device: str = "cpu",
    dtype: ModelDtype = "auto",
    seed: int = 0,
) -> ImageEncoder:
    """`model`'s image tower with `pretrained` weights (the same rules as `load_vision_tower`),
    whatever its architecture."""
    built = backbones.build(model, pretrained, seed)
    torch_device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    visual = built.visual.to(device=torch_device, dtype=torch_dtype).eval().requires_grad_(False)
    encoder = ImageEncoder(
        visual, built.preprocess, model, built.pretrained, torch_dtype, torch_device
    )
    probe = built.preprocess(Image.new("RGB", (64, 64)))[None]
    encoder.image_size = probe.shape[-1]
    encoder.embed_dim = encoder.embed(probe).shape[1]
    return encoder


def _vision_tower(
    built: backbones.Built, model: str, device: str, dtype: ModelDtype
) -> VisionTower:
    parts = backbones.vit_parts(model, built.visual)
    torch_device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    visual = built.visual.to(device=torch_device, dtype=torch_dtype).eval().requires_grad_(False)
    tower = VisionTower(
        visual=visual,
        preprocess=built.preprocess,
        model=model,
        pretrained=built.pretrained,
        dtype=torch_dtype,
        device=torch_device,
        blocks=parts.blocks,
        batch_first=parts.batch_first,
        layout=parts.layout,
        d_model=parts.d_model,
        image_size=parts.image_size,
    )
    probe = torch.zeros(1, 3, tower.image_size, tower.image_size)
    found = residual_stream(tower, probe, [0])[0].shape[1]
    if found != tower.n_tokens:
        raise BadSetting(
            f"{model}: its blocks carry {found} tokens, but its prefix {parts.layout.prefix} and "
            f"patch grid {parts.layout.grid} make {tower.n_tokens}: a ViT whose token layout "
            "vitscope cannot read; pick another model"
        )
    return tower


BlockHook = Callable[[Tensor], Tensor | None]
"""Sees a block's output batch first, (B, T, D); a tensor it returns (same shape) replaces it."""


class _StopForward(Exception):
    """Raised by the hook on the deepest requested block: nothing after it is needed."""


@contextmanager
def _block_hooks(tower: VisionTower, hooks: dict[int, BlockHook]) -> Iterator[None]:
    """Register `hooks[layer]` on the output of each block: the one path that reads the residual
    stream and the one that edits it, hiding open_clip's (T, B, D) layout when not batch first."""
    batch_first = tower.batch_first

    def wrap(layer: int, hook: BlockHook):
        def forward_hook(_module: nn.Module, _inputs: object, output: Tensor) -> Tensor | None:
            acts_BTD = output if batch_first else output.transpose(0, 1)
            replaced = hook(acts_BTD)
            if replaced is None:
                return None
            if replaced.shape != acts_BTD.shape:
                raise BadSetting(
                    f"a replacement for block {layer}'s output must have its shape "
                    f"{tuple(acts_BTD.shape)}, not {tuple(replaced.shape)}"
                )
            replaced = replaced.to(device=output.device, dtype=output.dtype)
            return replaced if batch_first else replaced.transpose(0, 1)

        return forward_hook

    handles = [
        tower.blocks[layer].register_forward_hook(wrap(layer, h)) for layer, h in hooks.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _pixels(tower: VisionTower, images_BCHW: Tensor) -> Tensor:
    return images_BCHW.to(device=tower.device, dtype=tower.dtype, non_blocking=True)


@torch.inference_mode()
def residual_stream(
    tower: VisionTower, images_BCHW: torch.Tensor, layers: list[int]
) -> dict[int, torch.Tensor]:
    """Residual stream after each block in `layers`: {layer: (B, T, D)} in the model's dtype."""
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def capture(layer: int) -> BlockHook:
        def hook(acts_BTD: Tensor) -> None:
            captured[layer] = acts_BTD
            if layer == deepest:
                raise _StopForward

        return hook

    with _block_hooks(tower, {layer: capture(layer) for layer in layers}), suppress(_StopForward):
        tower.visual(_pixels(tower, images_BCHW))
    return {layer: captured[layer] for layer in layers}


@torch.inference_mode()
def spliced_forward(
    tower: VisionTower, images_BCHW: Tensor, layer: int, replace: BlockHook
) -> Tensor:
    """Final image embeddings (B, E) (CLIP's through ln_post and the projection, timm's pooled,
    normed output) of a forward pass whose residual stream after block `layer` is
    `replace(acts_BTD)` (None keeps it)."""
    with _block_hooks(tower, {layer: replace}):
        return tower.visual(_pixels(tower, images_BCHW))
