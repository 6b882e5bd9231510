"""Export an SAE in SAELens' layout: `cfg.json` + `sae_weights.safetensors`, loadable with
`sae_lens.SAE.load_from_disk(folder)`.

SAELens' TopK SAE computes z = relu(topk((x − b_dec) · W_enc + b_enc)), x̂ = z · W_dec + b_dec on
the raw activations (normalize_activations "none"). Ours scales the input by s first, so the
scale is folded into the weights: W_enc = s · W_encᵀ, b_dec = b_pre / s, W_dec = W_dec / s. Then
every pre-activation, every kept latent and the reconstruction are the same numbers.

What differs by architecture (SAELens' architecture name and keys, extra tensors, metadata) is
each architecture's `saelens_layout()` (saes/architectures/): BatchTopK and Matryoshka SAEs are
exported as SAELens saves its own (BatchTopKTrainingSAE and MatryoshkaBatchTopKTrainingSAE save
inference models): a JumpReLU SAE, z = relu(pre) · [pre > θ], with θ in every latent's
`threshold` (the pre-activations are unchanged by the folding, so θ is too) and the training
architecture named in the metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from vitscope.saes.sae import SAE
from vitscope.support.errors import BadSetting
from vitscope.support.outputs import json_with

SAELENS_FORMAT_VERSION = "6.54.12"
"""The SAELens release whose layout this writes (the test loads the export with it)."""


SAELENS_EXPORT = json_with(
    "a SAELens export by vitscope", "metadata", "exported_by", value="vitscope", inside="cfg.json"
)
"""What `vitscope to-saelens` writes into again without --overwrite."""


def export_saelens(sae: SAE, out: Path) -> Path:
    """Write `sae` into `out` in SAELens' TopK (or, for BatchTopK and Matryoshka SAEs, JumpReLU)
    layout; returns the folder."""
    card = sae.card
    if sae.activation != "relu" or card.input_norm != "scale":
        raise BadSetting(
            f"{sae.describe()} keeps raw top-k values or standardises its inputs; SAELens' TopK "
            "SAE applies ReLU to raw inputs, so an export would not compute the same function"
        )
    scale = float(sae.input_scale)
    with torch.no_grad():
        tensors = {
            "W_enc": (sae.w_enc * scale).T.contiguous().float().cpu(),
            "b_enc": sae.b_enc.detach().float().cpu().clone(),
            "W_dec": (sae.w_dec / scale).contiguous().float().cpu(),
            "b_dec": (sae.b_pre / scale).detach().float().cpu().clone(),
        }
    layout = sae.saelens_layout()
    tensors.update(layout.tensors)
    cfg = {
        **layout.cfg,
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "model_name": card.model,
            "hook_name": None if card.layer is None else f"blocks.{card.layer}.hook_resid_post",
            **layout.metadata,
            "exported_by": "vitscope",
            "vitscope_card": card.to_json(),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "sae_weights.safetensors")
    (out / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return out
