"""What every backbone family hands the pipeline: the model as its library built it, and where
its ViT keeps the residual stream."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor, nn

from vitscope.cache_spec.tokens import TokenLayout

RANDOM = "none"
"""The `pretrained` of seeded random weights; 'none:seed=S' records the seed."""

_torchvision_stub_ops: torch.library.Library | None = None


@dataclass
class Built:
    """A model on the CPU in float32, as its own library builds it."""

    visual: nn.Module
    """Pixels (B, 3, H, W) -> final image embeddings (B, E): what splices and MS embed with."""
    preprocess: Callable[[Image.Image], Tensor]
    """The library's own inference transform for this model."""
    pretrained: str
    """The tag or file the weights came from, or 'none:seed=S' for seeded random weights."""
    clip: nn.Module | None = None
    """The whole CLIP model when it has a text tower (`encode_text`), else None."""
    tokenizer: Callable[[], Callable[[list[str]], Tensor]] | None = None
    """Makes the tokenizer (texts -> token ids for `clip.encode_text`) when a caller needs one:
    some (SigLIP's) come from the hub. None without a text tower."""


@dataclass(frozen=True)
class ViTParts:
    """Where a ViT's residual stream is: the blocks to hook and how their outputs are laid out."""

    blocks: nn.ModuleList | nn.Sequential
    batch_first: bool
    """False for open_clip towers that run their blocks (T, B, D)."""
    d_model: int
    image_size: int
    """Side of the square input the blocks were built for."""
    layout: TokenLayout


def random_seed(pretrained: str, seed: int) -> int | None:
    """The seed of random weights ('none' -> `seed`, 'none:seed=S' -> S), None for real ones."""
    if pretrained == RANDOM:
        return seed
    if pretrained.startswith(f"{RANDOM}:seed="):
        return int(pretrained.removeprefix(f"{RANDOM}:seed="))
    return None


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Build random weights from `seed` without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


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


def import_timm():
    """Import timm, which imports torchvision: through `import_open_clip`'s workaround."""
    import_open_clip()
    import timm
    import timm.data

    return timm
