"""`load_sae(ref)`: one call for every SAE people have: a folder, a CLIP-Scope .pt, a hub id."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from vitscope.saes.card import InputNorm, SAEFormatError
from vitscope.saes.folder import NOT_AN_SAE_FIX, load_sae_folder
from vitscope.saes.sae import SAE

HUB_REFERENCE = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?$")
"""owner/name, optionally followed by a path inside the repo (a subfolder or a .pt file)."""


def load_sae(
    ref: str | Path,
    device: str | torch.device = "cpu",
    input_norm: InputNorm | None = None,
    revision: str | None = None,
) -> SAE:
    """The SAE at `ref`, ready for `encode`, `decode` and `sae(acts)` in activation units.

    `ref` is a local SAE or run folder, a CLIP-Scope `.pt` checkpoint, or a Hugging Face hub
    reference `owner/name[/path]` (fetched with huggingface_hub; needs the network once, then the
    local hub cache). `input_norm` overrides how inputs are normalised: CLIP-Scope's SAEs load
    with "scale" (raw activations, as its package feeds them); "standardize" feeds each batch
    standardised, as CLIP-Scope trained them. The SAE comes for inference, its parameters
    frozen (`sae.requires_grad_(True)` to train it further).
    """
    path = Path(ref)
    if path.exists():
        sae = _load_local(path, device, input_norm)
    elif isinstance(ref, str) and HUB_REFERENCE.match(ref) and not Path(path.parts[0]).exists():
        # `runs/layer20` with runs/ here is a mistyped local path, not the hub repo runs/layer20
        from vitscope.saes.hub import fetch

        sae = _load_local(fetch(ref, revision), device, input_norm)
    else:
        raise SAEFormatError(path, "an SAE", "no such file or directory", NOT_AN_SAE_FIX)
    return sae.eval().requires_grad_(False)


def _load_local(path: Path, device: str | torch.device, input_norm: InputNorm | None) -> SAE:
    if path.is_file() and path.suffix == ".pt":
        from vitscope.saes.clipscope import load_clipscope

        return load_clipscope(path, device, input_norm or "scale")
    sae = load_sae_folder(path, device)
    if input_norm is not None:
        sae.set_input_norm(input_norm)
    return sae
