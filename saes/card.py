"""An SAE's card: the cfg.json beside its weights, saying what the SAE computes (its shape, its
architecture and that architecture's options) and what it belongs to (model, weights, layer, hook,
tokens), so a folder is usable without its training run.

saes/SAE_FORMAT.md is the prose of this module; a test keeps the two in step. Reading and writing
cfg.json, every format version included, is saes/folder.py's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from vitscope.support.configs import AtLeast, check_bounds
from vitscope.support.errors import BadSetting, MissingInput
from vitscope.support.records import FileFormatError

SAE_FORMAT = "vitscope-sae"
SAE_FORMAT_VERSION = "1.4"
RESID_POST = "resid_post"
"""The hook of cache_spec/SPEC.md: the residual stream after transformer block `layer`."""

Activation = Literal["relu", "none"]
InputNorm = Literal["scale", "standardize"]


class SAEFormatError(FileFormatError):
    """An SAE folder or file does not match its format: names the file and the fix."""


@dataclass(frozen=True)
class Options:
    """An architecture's own card fields (each architecture subclasses this in its module under
    saes/architectures/): what its SAE computes beyond the shape, with bounds and defaults."""

    architecture: ClassVar[str]
    """The name the card and the registry know the architecture by."""
    k: Annotated[int, AtLeast(1)]
    """Active latents per input vector (batch rules: on average, in training)."""

    def __post_init__(self) -> None:
        check_bounds(self)

    def check(self, n_latents: int) -> None:
        """Refuse options that do not fit a dictionary of `n_latents` (ValueError)."""


@dataclass(frozen=True)
class SAECard:
    """What cfg.json holds: the SAE's function, then where its inputs come from."""

    d_in: int
    """Width of the activations it reads (d_model of the layer)."""
    n_latents: int
    """Dictionary size F."""
    options: Options
    """The architecture and its options; in cfg.json `architecture` names it and the options'
    fields sit beside the others (SAE_FORMAT.md has a table per architecture)."""
    input_scale: float = 1.0
    """Activations are multiplied by this before encoding (E‖x − x̄‖² = 1 on the training data
    since format 1.2's recipe, E‖x‖² = 1 before; either way a number the SAE stores)."""
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
    """The full training config, for the record (null for imported SAEs), with the run's token
    norm thresholds (train/outliers.py); its cache (absolute, or a URL) is what commands read
    when not given --cache."""
    format: str = SAE_FORMAT
    """Always vitscope-sae."""
    format_version: str = SAE_FORMAT_VERSION
    """major.minor of this format; readers refuse another major."""

    def __post_init__(self) -> None:
        self.options.check(self.n_latents)

    @property
    def architecture(self) -> str:
        return self.options.architecture

    def to_json(self) -> dict[str, Any]:
        """cfg.json's object: the options flat beside the other fields, after `architecture`."""
        data = dataclasses.asdict(self)
        options = data.pop("options")
        shape = {key: data.pop(key) for key in ("d_in", "n_latents")}
        return {**shape, "architecture": self.architecture, **options, **data}

    def cache_or(self, given: str, who: str) -> str:
        """`given` if set, else the cache the SAE was trained on (training.cache of the cfg.json
        of `who`); one line naming that file and --cache when it names none, or none there."""
        if given:
            return given
        cache = (self.training or {}).get("cache")
        card = Path(who) / "cfg.json" if Path(who).is_dir() else f"the cfg.json of {who}"
        if not cache:
            raise BadSetting(
                "the SAE does not name the cache it was trained on (no training.cache)",
                path=card,
                fix="pass --cache CACHE",
            )
        local = Path(cache.removeprefix("file://"))
        if "://" in str(local) or local.exists():
            return cache
        relative = "" if local.is_absolute() else f" (a relative path, read from {Path.cwd()})"
        raise MissingInput(
            f"training.cache names the cache {cache}, which is not there{relative}",
            path=card,
            fix="pass --cache CACHE where it is now",
        )
