"""How activation values become stored numbers and back: float16 by default, or 8 bits with scales.

At 19 TB for CLIP-Scope's 4.5M images, bytes per value is the lever. The 8-bit encodings keep one
float32 scale per channel per chunk (ViT residuals have a few channels far larger than the rest,
so one scale per tensor would crush the others), computed from the chunk itself: no calibration
pass, and every writer of a cache quantizes the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vitscope.support.errors import BadSetting

FLOAT16_MAX = float(torch.finfo(torch.float16).max)


class StorageRangeError(BadSetting):
    """Activations that the chosen storage cannot hold (non-finite, or beyond float16's range)."""


@dataclass(frozen=True)
class Encoding:
    """One storage format: its zarr dtype, whether it needs per-chunk scales, and its grid."""

    name: str
    zarr_dtype: str
    levels: float = 0.0
    """Largest stored magnitude for scaled formats (127 for int8, 448 for float8 e4m3)."""

    @property
    def scaled(self) -> bool:
        return self.levels > 0

    @property
    def bytes_per_value(self) -> int:
        return np.dtype(self.zarr_dtype).itemsize

    def encode(self, acts_NTD: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Float activations (any device) -> (stored array on the host, scales_D or None)."""
        stored, scale_D, peak = self.encode_on_device(acts_NTD)
        self.check_peak(float(peak))
        return stored.cpu().numpy(), None if scale_D is None else scale_D.cpu().numpy()

    def encode_on_device(
        self, acts_NTD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(stored values, scales_D or None, peak |value|) where the activations are, without
        waiting for the device: the caller checks the peak once it has it (`check_peak`)."""
        peak = acts_NTD.abs().amax()
        if not self.scaled:
            return acts_NTD.to(_TORCH_DTYPES[self.name]), None, peak
        absmax_D = acts_NTD.abs().amax(dim=(0, 1)).float()
        scale_D = torch.where(absmax_D > 0, absmax_D / self.levels, torch.ones_like(absmax_D))
        scaled = acts_NTD.float() / scale_D
        if self.name == "int8":
            stored = scaled.round_().clamp_(-127, 127).to(torch.int8)
        else:
            stored = scaled.to(torch.float8_e4m3fn).view(torch.uint8)
        return stored, scale_D, peak

    def check_peak(self, peak: float) -> None:
        """The chunk's largest |value| (NaN if any value is NaN: max propagates it)."""
        if peak != peak or peak == float("inf"):
            raise StorageRangeError("activation values are NaN or infinite")
        if self.name == "float16" and peak > FLOAT16_MAX:
            raise StorageRangeError(
                f"activations reach {peak:.4g}, beyond float16's {FLOAT16_MAX:.0f}; "
                "cache with --storage float32 or int8"
            )

    def decode(
        self, stored: np.ndarray, scale: np.ndarray | None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Stored numbers -> activations in `dtype`; `scale` broadcasts against them (…, D).

        float16 storage decoded to float16 is the stored array itself: no copy, no conversion.
        """
        values = torch.from_numpy(np.ascontiguousarray(stored))
        if not self.scaled:
            return values.to(dtype)
        if self.name == "float8_e4m3":
            values = values.view(torch.float8_e4m3fn)
        if scale is None:
            raise ValueError(f"{self.name} storage needs its per-chunk scales to decode")
        return values.to(dtype).mul_(torch.from_numpy(scale).to(dtype))


_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}

ENCODINGS: dict[str, Encoding] = {
    "float16": Encoding("float16", "float16"),
    "float32": Encoding("float32", "float32"),
    "int8": Encoding("int8", "int8", levels=127.0),
    "float8_e4m3": Encoding("float8_e4m3", "uint8", levels=448.0),
}
