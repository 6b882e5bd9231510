"""Load an open_clip vision tower and read its residual stream after chosen blocks, in one pass.

Layer L is the output of transformer block L (0-indexed), every token, CLS at index 0: the
convention of CLIP-Scope's published SAEs. The forward pass stops after the deepest requested
block, so caching layers 2..22 of ViT-L-14 never runs blocks 23, ln_post or the projection.
The same block hook can instead replace a block's output and run on to the image embedding
(`spliced_forward`), so a splice eval edits exactly the activations the cache holds.
`load_image_encoder` loads any open_clip model's image tower, ViT or not, for its embeddings only
(the MonoSemanticity Score's similarities).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from torch import Tensor, nn

from vitscope.support.errors import BadSetting, Unreachable

ModelDtype = Literal["auto", "float32", "bfloat16", "float16"]
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_torchvision_stub_ops: torch.library.Library | None = None


def import_open_clip():
    """Import open_clip, working around one known torchvision/torch mismatch.

    `make install` on a CPU machine pairs torch 2.13.0 (a CPU build) with torchvision 0.28.0 (a CUDA
    build), the smallest pair that installs from local disk. That torchvision cannot load its
    native ops, and its import then dies registering fake kernels for `nms` and `qnms`. open_clip
    needs only torchvision's Python transforms, never those ops, so declaring the two schemas lets
    the import finish; calling nms would still fail loudly. On a matched pair this does nothing.
    """
    global _torchvision_stub_ops
    try:
        import torchvision
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _torchvision_stub_ops = torch.library.Library("torchvision", "DEF")
        _torchvision_stub_ops.define(
            "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
        )
        _torchvision_stub_ops.define(
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
        )
        import torchvision  # noqa: F401
    import open_clip

    return open_clip


@dataclass
class VisionTower:
    """A vision tower ready to run, with what the cache spec records about it."""

    visual: nn.Module
    preprocess: nn.Module
    model: str
    pretrained: str
    """The tag or file the weights came from, or 'none:seed=S' for seeded random weights."""
    dtype: torch.dtype
    device: torch.device
    n_blocks: int
    n_tokens: int
    d_model: int
    image_size: int

    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks


def resolve_dtype(dtype: ModelDtype, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on a GPU and float32 on the CPU, where bfloat16 is often emulated."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _TORCH_DTYPES[dtype]


def load_vision_tower(
    model: str, pretrained: str, device: str = "cpu", dtype: ModelDtype = "auto", seed: int = 0
) -> VisionTower:
    """Build `model` with `pretrained` weights ('none' for random ones seeded by `seed`).

    `pretrained` is an open_clip tag (fetched from the hub when online), a local weights file,
    'none', or 'none:seed=S' as a cache or SAE card records random weights (S overrides `seed`).
    """
    clip, preprocess, recorded = _create_clip(model, pretrained, seed)
    return _vision_tower(clip.visual, preprocess, model, recorded, device, dtype)


@dataclass
class ClipModel:
    """The vision tower with the text side of its CLIP model, for zero-shot classification."""

    tower: VisionTower
    encode_text: Callable[[Tensor], Tensor]
    """Token ids (N, context) -> text embeddings (N, E), in the image embeddings' space."""
    tokenizer: Callable[[list[str]], Tensor]
    """Texts -> token ids (N, context) on the CPU."""


def load_clip(
    model: str, pretrained: str, device: str = "cpu", dtype: ModelDtype = "auto", seed: int = 0
) -> ClipModel:
    """`load_vision_tower`'s tower (same weights, same seed rules) and its model's text tower."""
    clip, preprocess, recorded = _create_clip(model, pretrained, seed)
    tower = _vision_tower(clip.visual, preprocess, model, recorded, device, dtype)
    clip = clip.to(device=tower.device, dtype=tower.dtype).eval().requires_grad_(False)
    return ClipModel(tower, clip.encode_text, import_open_clip().get_tokenizer(model))


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
    return not model.startswith("timm:")


def load_text_tower(
    model: str, pretrained: str, device: str = "cpu", dtype: ModelDtype = "auto", seed: int = 0
) -> TextTower:
    """`model`'s text tower with `pretrained` weights (the same rules and seed as
    `load_vision_tower`, so random weights match the image tower a cache was made with)."""
    if not has_text_tower(model):
        raise BadSetting(f"{model} has no text tower; only a CLIP-family model embeds text")
    clip, _, _ = _create_clip(model, pretrained, seed)
    torch_device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    clip = clip.to(device=torch_device, dtype=torch_dtype).eval().requires_grad_(False)
    return TextTower(clip, import_open_clip().get_tokenizer(model), torch_device)


@dataclass
class ImageEncoder:
    """Any open_clip model's image tower (a ViT or not), for final image embeddings only."""

    visual: nn.Module
    preprocess: nn.Module
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
    model: str, pretrained: str, device: str = "cpu", dtype: ModelDtype = "auto", seed: int = 0
) -> ImageEncoder:
    """`model`'s image tower with `pretrained` weights (the same rules as `load_vision_tower`),
    whatever its architecture."""
    clip, preprocess, recorded = _create_clip(model, pretrained, seed)
    torch_device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    visual = clip.visual.to(device=torch_device, dtype=torch_dtype).eval().requires_grad_(False)
    encoder = ImageEncoder(visual, preprocess, model, recorded, torch_dtype, torch_device)
    probe = preprocess(Image.new("RGB", (64, 64)))[None]
    encoder.image_size = probe.shape[-1]
    encoder.embed_dim = encoder.embed(probe).shape[1]
    return encoder


def _create_clip(model: str, pretrained: str, seed: int) -> tuple[nn.Module, nn.Module, str]:
    """The whole open_clip model on the CPU, its preprocessing, and `pretrained` as recorded."""
    if pretrained.startswith("none:seed="):
        pretrained, seed = "none", int(pretrained.removeprefix("none:seed="))
    open_clip = import_open_clip()
    if model not in open_clip.list_models():
        raise BadSetting(f"unknown open_clip model {model!r}; see open_clip.list_models()")
    random_weights = pretrained == "none"
    if not random_weights and not os.path.exists(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model)
        if pretrained not in tags:
            raise BadSetting(
                f"{pretrained!r} is neither a weights file nor a pretrained tag of {model} "
                f"({', '.join(tags) or 'none'}); pass 'none' for random weights"
            )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            clip, _, preprocess = open_clip.create_model_and_transforms(
                model, pretrained=None if random_weights else pretrained
            )
        except RuntimeError as err:  # open_clip wraps every download failure in one
            if "Failed to download" not in str(err):
                raise
            raise Unreachable(
                f"{model} ({pretrained}): expected its weights in the local cache or from the "
                "hub, found neither (offline?); run once online so open_clip caches them, or "
                "pass a weights file instead of the tag"
            ) from None
    return clip, preprocess, f"none:seed={seed}" if random_weights else pretrained


def _vision_tower(
    visual: nn.Module,
    preprocess: nn.Module,
    model: str,
    pretrained: str,
    device: str,
    dtype: ModelDtype,
) -> VisionTower:
    if not hasattr(visual, "transformer") or not hasattr(visual.transformer, "resblocks"):
        raise BadSetting(f"{model}'s vision tower has no transformer.resblocks: not a ViT")
    torch_device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    visual = visual.to(device=torch_device, dtype=torch_dtype).eval().requires_grad_(False)
    size = visual.image_size
    tower = VisionTower(
        visual=visual,
        preprocess=preprocess,
        model=model,
        pretrained=pretrained,
        dtype=torch_dtype,
        device=torch_device,
        n_blocks=len(visual.transformer.resblocks),
        n_tokens=0,
        d_model=visual.transformer.width,
        image_size=size[0] if isinstance(size, tuple) else size,
    )
    probe = torch.zeros(1, 3, tower.image_size, tower.image_size)
    tower.n_tokens = residual_stream(tower, probe, [0])[0].shape[1]
    return tower


BlockHook = Callable[[Tensor], Tensor | None]
"""Sees a block's output batch first, (B, T, D); a tensor it returns (same shape) replaces it."""


class _StopForward(Exception):
    """Raised by the hook on the deepest requested block: nothing after it is needed."""


@contextmanager
def _block_hooks(tower: VisionTower, hooks: dict[int, BlockHook]) -> Iterator[None]:
    """Register `hooks[layer]` on the output of each block: the one path that reads the residual
    stream and the one that edits it, hiding open_clip's (T, B, D) layout when not batch first."""
    batch_first = getattr(tower.visual.transformer, "batch_first", True)

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
    """Final image embeddings (B, E) (through ln_post and the projection) of a forward pass
    whose residual stream after block `layer` is `replace(acts_BTD)` (None keeps it)."""
    with _block_hooks(tower, {layer: replace}):
        return tower.visual(_pixels(tower, images_BCHW))
