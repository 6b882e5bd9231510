"""Which of an image's T tokens is what: named prefix tokens, then the patch grid in raster order.

Backbones differ: CLIP's ViTs have one CLS token, DINOv2-reg a CLS and 4 registers, SigLIP no
prefix at all, and patch grids need not be square. A cache records its layout (spec 1.4); caches
written before say nothing and are CLIP's "CLS + square grid" (`TokenLayout.legacy`). Everything
that picks tokens (training's token sets, `--token cls`, MSE by position, heatmaps, pictures)
asks the layout instead of assuming CLS at 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from vitscope.support.errors import BadSetting

TokenSet = Literal["all", "cls", "patches"]
"""Tokens of each image an SAE trains on: all, the CLS token alone, or the patches alone."""

CLS = "cls"
"""Name of the class token among the prefix tokens."""


@dataclass(frozen=True)
class TokenLayout:
    """T = len(prefix) + rows * cols tokens: the prefix tokens, then the patches row by row."""

    prefix: tuple[str, ...]
    """Names of the tokens before the patches, in order: 'cls', 'reg0', 'reg1', ... ."""
    grid: tuple[int, int]
    """Patch grid (rows, cols)."""

    def __post_init__(self) -> None:
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise BadSetting(f"a patch grid is (rows, cols) of at least 1, not {self.grid}")
        if len(set(self.prefix)) != len(self.prefix):
            raise BadSetting(f"prefix token names must differ, not {self.prefix}")

    @classmethod
    def legacy(cls, n_tokens: int) -> TokenLayout:
        """CLIP's layout, which caches before spec 1.4 hold: CLS at 0, then a square grid."""
        side = math.isqrt(n_tokens - 1)
        if side < 1 or side * side != n_tokens - 1:
            raise BadSetting(
                f"{n_tokens} tokens are not CLS + a square patch grid; record the layout"
            )
        return cls((CLS,), (side, side))

    @property
    def n_prefix(self) -> int:
        return len(self.prefix)

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + self.n_patches

    @property
    def has_cls(self) -> bool:
        return CLS in self.prefix

    @property
    def registers(self) -> tuple[str, ...]:
        """Prefix tokens other than CLS (DINOv2-reg's 4 registers)."""
        return tuple(name for name in self.prefix if name != CLS)

    @property
    def patches(self) -> slice:
        """The patch tokens, in raster order."""
        return slice(self.n_prefix, self.n_tokens)

    @property
    def cls_index(self) -> int:
        """Position of the CLS token; a one-line error for models that have none (SigLIP)."""
        if not self.has_cls:
            raise BadSetting(
                f"this model has no CLS token (prefix: {list(self.prefix) or 'none'}); "
                "use the patches or all tokens instead"
            )
        return self.prefix.index(CLS)

    def token_set(self, tokens: TokenSet) -> slice:
        """The tokens of one image a token set names."""
        if tokens == "cls":
            index = self.cls_index
            return slice(index, index + 1)
        if tokens == "patches":
            return self.patches
        return slice(0, self.n_tokens)

    def subset(self, tokens: TokenSet) -> TokenLayout | None:
        """The layout of the tokens a token set keeps, or None when it keeps no patch grid."""
        if tokens == "cls":
            return None
        return TokenLayout(() if tokens == "patches" else self.prefix, self.grid)

    def position_names(self) -> list[str]:
        """A name per token: the prefix names, then 'r,c' for each patch."""
        rows, cols = self.grid
        return [*self.prefix, *(f"{r},{c}" for r in range(rows) for c in range(cols))]
