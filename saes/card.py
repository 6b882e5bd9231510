"""An SAE's card: the cfg.json beside its weights, saying what the SAE computes and what it
belongs to (model, weights, layer, hook, tokens), so a folder is usable without its training run.

saes/SAE_FORMAT.md is the prose of this module; a test keeps the two in step. Run folders
written before format 1.0 (the training config plus the SAE's shape, no `format_version`) are
read as format 0 and still load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vitscope.support.records import FileFormatError, parse_record, read_json

SAE_FORMAT = "vitscope-sae"
SAE_FORMAT_VERSION = "1.1"
RESID_POST = "resid_post"
"""The hook of cache_spec/SPEC.md: the residual stream after transformer block `layer`."""

Activation = Literal["relu", "none"]
Architecture = Literal["topk", "batchtopk", "matryoshka"]
InputNorm = Literal["scale", "standardize"]


class SAEFormatError(FileFormatError):
    """An SAE folder or file does not match its format: names the file and the fix."""


@dataclass(frozen=True)
class SAECard:
    """What cfg.json holds: the SAE's function, then where its inputs come from."""

    d_in: int
    """Width of the activations it reads (d_model of the layer)."""
    n_latents: int
    """Dictionary size F."""
    k: int
    """Active latents per input vector (batchtopk, matryoshka: on average, in training)."""
    input_scale: float = 1.0
    """Activations are multiplied by this before encoding (E‖x‖² = 1 on the training data)."""
    architecture: Architecture = "topk"
    """The encoder's sparsity rule: topk keeps the k largest pre-activations of each vector;
    batchtopk and matryoshka (Matryoshka-BatchTopK) those above the `threshold` tensor, which
    training estimated from the batch-wide top B·k (saes/SAE_FORMAT.md)."""
    matryoshka_widths: tuple[int, ...] = ()
    """matryoshka: the nested prefix sizes whose reconstruction losses were summed, ascending,
    the last = n_latents (empty for the other architectures)."""
    activation: Activation = "relu"
    """Applied to the k kept values: relu (Gao et al.) or none (CLIP-Scope keeps raw values)."""
    input_norm: InputNorm = "scale"
    """scale: x · input_scale; standardize: each batch to zero mean, unit variance (CLIP-Scope's
    training inputs), undone after decoding."""
    model: str | None = None
    """open_clip model name of the vision tower, e.g. ViT-L-14 (null if unknown)."""
    pretrained: str | None = None
    """open_clip pretrained tag or weights file, or none:seed=S (null if unknown)."""
    layer: int | None = None
    """Block whose output the SAE reads (null if unknown)."""
    hook: str = RESID_POST
    """Where in the block: resid_post = the residual stream after the block (SPEC.md)."""
    token_set: str = "all"
    """Tokens it was trained on: all (CLS and patches), cls or patches."""
    tokens_trained: int = 0
    """Training tokens seen."""
    cache_spec_version: str | None = None
    """Spec version of the cache it was trained from (null if not from a vitscope cache)."""
    source: str = "vitscope"
    """Who made it: vitscope, clip-scope, or where it was imported from."""
    training: dict | None = None
    """The full training config, for the record (null for imported SAEs)."""
    format: str = SAE_FORMAT
    """Always vitscope-sae."""
    format_version: str = SAE_FORMAT_VERSION
    """major.minor of this format; readers refuse another major."""

    def __post_init__(self) -> None:
        if self.architecture != "topk" and self.activation != "relu":
            raise ValueError(
                f"architecture {self.architecture} applies ReLU; activation must be relu, not "
                f"{self.activation}"
            )
        widths = self.matryoshka_widths
        if self.architecture != "matryoshka" and widths:
            raise ValueError(f"matryoshka_widths is for matryoshka SAEs, not {self.architecture}")
        if self.architecture == "matryoshka" and not (
            widths
            and widths[-1] == self.n_latents
            and all(a < b for a, b in zip((0, *widths), widths, strict=False))
        ):
            raise ValueError(
                f"matryoshka_widths must ascend from above 0 to n_latents ({self.n_latents}), "
                f"not {list(widths)}"
            )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def cache_or(self, given: str, who: str) -> str:
        """`given` if set, else the cache the SAE was trained on; ValueError naming `who`."""
        cache = given or (self.training or {}).get("cache")
        if not cache:
            raise ValueError(
                f"{who}: the SAE does not name the cache it was trained on; pass --cache CACHE"
            )
        return cache


def read_card(path: Path) -> SAECard:
    """Parse cfg.json (any supported format version); SAEFormatError names the file and field."""
    data = read_json(path, SAEFormatError)
    if not isinstance(data, dict):
        raise SAEFormatError(path, "a JSON object (an SAE's cfg.json)", type(data).__name__)
    if "format_version" not in data:
        return _card_from_format_0(data, path)
    version = str(data["format_version"])
    if version.split(".")[0] != SAE_FORMAT_VERSION.split(".")[0]:
        raise SAEFormatError(
            path,
            f"SAE format {SAE_FORMAT_VERSION.split('.')[0]}.x",
            f"format {version}",
            "upgrade vitscope to read it (pip install -U vitscope)",
        )
    return parse_record(SAECard, data, path, "SAE card", SAEFormatError)


def _card_from_format_0(data: dict[str, Any], path: Path) -> SAECard:
    """Before format 1.0 cfg.json was the training config plus d_in, n_latents, k, k_aux and
    input_scale; the model was only named by the cache it was trained on."""
    missing = [key for key in ("d_in", "n_latents", "k", "input_scale") if key not in data]
    if missing:
        raise SAEFormatError(
            path,
            "an SAE card (format_version, d_in, n_latents, k, ...)",
            f"no {', '.join(missing)}",
            "point at a folder written by `vitscope train`",
        )
    return SAECard(
        d_in=data["d_in"],
        n_latents=data["n_latents"],
        k=data["k"],
        input_scale=data["input_scale"],
        layer=data.get("layer"),
        token_set=data.get("token_set", "all"),
        tokens_trained=data.get("tokens", 0),
        training=data,
        format_version="0",
    )
