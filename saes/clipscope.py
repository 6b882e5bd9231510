"""CLIP-Scope's released SAEs (Lewington et al., 2024): `{layer}_resid/{tokens}.pt` checkpoints.

Each file is a torch dict whose `model_state_dict` holds pre_b [D], enc [D, F] and dec [F, D],
beside k (32), d_in, n_features and token_count. Their forward pass (clipscope 0.1.8, sae.py) is

    z = topk((x − pre_b) · enc)      the 32 largest raw values: no ReLU, no latent bias
    x̂ = z · dec + pre_b              decoder rows are not unit-normed

which is our TopKSAE with W_enc = encᵀ, b_enc = 0, W_dec = dec, b_pre = pre_b, activation none.
CLIP-Scope trained on per-batch standardised inputs (each feature over the batch's 32,896
tokens: (x − mean) / (std + 1e-6)), while its package feeds raw activations; `input_norm` chooses:
"scale" (with scale 1: raw, as its package does) or "standardize" (as the SAEs were trained, and
as their reported explained variance was measured).
The model is CLIP-Scope's: open_clip ViT-L-14, laion2b_s32b_b82k, residual stream after block L.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from vitscope.saes.architectures import build_sae
from vitscope.saes.architectures.topk import TopKOptions
from vitscope.saes.card import InputNorm, SAECard, SAEFormatError
from vitscope.saes.sae import SAE

CLIP_SCOPE_K = 32
CLIP_SCOPE_MODEL = ("ViT-L-14", "laion2b_s32b_b82k")
KEYS = ("pre_b", "enc", "dec")


def load_clipscope(
    path: Path, device: str | torch.device = "cpu", input_norm: InputNorm = "scale"
) -> SAE:
    """A CLIP-Scope checkpoint as a TopK SAE with its card (layer and tokens from the path)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for bytes it cannot unpickle
        raise SAEFormatError(
            path,
            "a CLIP-Scope checkpoint (a torch dict)",
            _load_failure(err),
            "only tensors are loaded (torch.load weights_only=True), never pickled code",
        ) from None
    state = checkpoint.get("model_state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or any(key not in state for key in KEYS):
        raise SAEFormatError(
            path,
            "a CLIP-Scope checkpoint with model_state_dict holding pre_b, enc and dec",
            f"keys {sorted(state) if isinstance(state, dict) else type(checkpoint).__name__}",
            "pass a `{layer}_resid/{tokens}.pt` file from CLIP-Scope's release",
        )
    pre_b, enc, dec = (state[key].float() for key in KEYS)
    d_in, n_latents = enc.shape
    if pre_b.shape != (d_in,) or dec.shape != (n_latents, d_in):
        raise SAEFormatError(
            path,
            f"pre_b [{d_in}] and dec [{n_latents}, {d_in}] to match enc {list(enc.shape)}",
            f"pre_b {list(pre_b.shape)}, dec {list(dec.shape)}",
        )
    layer, tokens = _layer_and_tokens(path)
    card = SAECard(
        d_in=d_in,
        n_latents=n_latents,
        options=TopKOptions(k=int(checkpoint.get("k", CLIP_SCOPE_K)), activation="none"),
        input_norm=input_norm,
        model=CLIP_SCOPE_MODEL[0],
        pretrained=CLIP_SCOPE_MODEL[1],
        layer=layer,
        tokens_trained=int(checkpoint.get("token_count", tokens)),
        source="clip-scope",
    )
    sae = build_sae(card)
    with torch.no_grad():
        sae.w_enc.copy_(enc.T)
        sae.w_dec.copy_(dec)
        sae.b_enc.zero_()
        sae.b_pre.copy_(pre_b)
    return sae.to(device)


def _load_failure(err: Exception) -> str:
    """torch.load's message in one line: the unpickler's own reason when there is one."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reason = next((line for line in lines if line.startswith("WeightsUnpickler error")), None)
    return f"{type(err).__name__}: {reason or (lines or [''])[0]}"


def _layer_and_tokens(path: Path) -> tuple[int | None, int]:
    """`22_resid/1200013184.pt` -> (22, 1200013184); unknown parts are None and 0."""
    layer = re.fullmatch(r"(\d+)_resid", path.parent.name)
    tokens = re.fullmatch(r"\d+", path.stem)
    return (int(layer.group(1)) if layer else None), (int(path.stem) if tokens else 0)
